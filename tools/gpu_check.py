"""The GPU acceptance run: every GPU branch once, end to end, with its figures, in one folder.

    python tools/gpu_check.py --out runs/gpu-check              # a fresh H100/H200 (make gpu-check)
    python tools/gpu_check.py --rehearse --out runs/gpu-check   # the same sequence on CPU, tiny sizes
    python tools/gpu_check.py --stages environment,pytest-gpu   # some stages only

Writes report.json and report.md (each stage's status, time, budget and figures) and logs/
under --out; a failed stage is recorded and the run goes on. Exit status 0 when every stage
passed, 1 otherwise (2: bad input). The stages and their budgets: elastic_megatron/jobs/gpu_check.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--out", default="runs/gpu-check", help="the report folder (new, empty, or an earlier report)")
    parser.add_argument("--rehearse", action="store_true", help="CPU rehearsal at tiny sizes (what CI runs)")
    parser.add_argument("--stages", default=None, help="comma-separated stage names to run (default: all)")
    args = parser.parse_args(argv)

    def job():
        from elastic_megatron.jobs.gpu_check import check

        only = [s for s in args.stages.split(",") if s] if args.stages else None
        run = check(Path(args.out), args.rehearse, only)
        results = run.execute()
        return run, results

    def done(outcome) -> str:
        run, results = outcome
        bad = [r.name for r in results if r.status in ("failed", "timeout")]
        return (f"gpu-check: {len(results) - len(bad)} of {len(results)} stages passed or skipped; report: "
                f"{run.out / 'report.md'}" + (f"; failed: {', '.join(bad)}" if bad else ""))

    code = run_tool(args, job, done)
    if code:
        return code
    report = Path(args.out) / "report.json"
    import json

    summary = json.loads(report.read_text())["summary"]
    return 1 if summary["failed"] or summary["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
