"""Evaluation table of an elastic checkpoint: one row per nested budget, against the same
sizes sliced from the sorted parent (a) and prefix-sliced from the unsorted parent (b).

    python tools/evaluate_elastic.py --elastic runs/demo-stage2 --sorted runs/demo-importance \
        --unsorted runs/demo-pretrain --out runs/demo-eval

Prints the table and writes <out>/evaluation.json and <out>/evaluation.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--elastic", required=True, help="elastic run dir or checkpoint dir (stage 1 or 2)")
    parser.add_argument("--sorted", required=True, help="sorted parent (importance run dir)")
    parser.add_argument("--unsorted", required=True, help="parent before sorting")
    parser.add_argument("--out", required=True, help="directory for evaluation.json and evaluation.png")
    parser.add_argument("--batches", type=int, default=16, help="validation micro-batches (default 16)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.jobs.evaluate import evaluate_elastic, render_table, write_outputs
    from elastic_megatron.parallel.setup import distributed

    def job():
        from elastic_megatron.config.errors import require_positive_int

        require_positive_int("--batches", args.batches)
        require_positive_int("--micro-batch-size", args.micro_batch_size)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ConfigError("--out", args.out, "is a file; give a directory for evaluation.json and evaluation.png")
        with distributed(1, 1, 1, seed=1234):
            return evaluate_elastic(args.elastic, args.sorted, args.unsorted, args.batches, args.micro_batch_size)

    def done(rows):
        json_path, png_path = write_outputs(rows, args.out)
        return f"{render_table(rows)}\nwrote {json_path} and {png_path}"

    return run_tool(args, job, done)


if __name__ == "__main__":
    sys.exit(main())
