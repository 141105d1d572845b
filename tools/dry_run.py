"""Dry-run a training job on its real layout before it queues: every rank's model (and
teacher) built on the meta device, checked against the memory estimate, the checkpoint
layout, the elastic spec and the data.

    python tools/dry_run.py stage2 --nodes 8 --gpus-per-node 8 elastic.teacher_checkpoint=<importance run> \\
        elastic.init_checkpoint=<stage 1 run> data.prefixes=[/data/mix_text_document]
    python tools/dry_run.py stage1 --nodes 8 --gpus-per-node 8 --skip-inputs elastic.teacher_checkpoint=planned
    bash slurm/stage2.sh --dry-run elastic.teacher_checkpoint=... (nodes and GPUs from the script's #SBATCH header)

One process stands in for the ranks one after another (Megatron's parallel state over
torch's fake process group): by default one rank per distinct (pp, tp, cp, ep, etp),
whose builds hold every module and checkpoint shard of the layout; `--ranks all` builds
every rank. Prints one row per simulated rank (parameters, GiB of weights, gradients,
optimizer state, teacher, activations, KD logits, total) next to the analytic estimate,
the budgets' parameter counts, and one `FAIL` line per failure naming the rank, the
module and the key. Exit status 0: every check passed; 2: bad input or a failed check.
The whole design and what is and is not checked: elastic_megatron/jobs/dry_run.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ranks(value: str):
    if value in ("classes", "all"):
        return value
    try:
        return [int(r) for r in value.split(",")]
    except ValueError:
        return value  # refused with the allowed values by the job


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__, whole_doc=True)
    parser.set_defaults(verify="sizes")  # input checkpoints: presence and sizes; the job itself hashes them
    parser.add_argument("recipe", help="recipe name (recipes/<name>.yaml), e.g. stage1, stage2, qad")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as the job would get them")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80: H100)")
    parser.add_argument("--ranks", type=_ranks, default="classes",
                        help="classes (default: one rank per distinct pp/tp/cp/ep/etp), all, or a comma-separated list")
    parser.add_argument("--skip-inputs", action="store_true",
                        help="do not check data and input checkpoints (planning a stage whose inputs do not exist yet)")
    parser.add_argument("--json", default=None, help="also write the report (with every simulated rank's shards) here")
    args = parser.parse_intermixed_args(argv)

    failures: list[int] = []

    def job():
        from elastic_megatron.config.compose import compose_recipe
        from elastic_megatron.jobs.dry_run import dry_run

        report = dry_run(compose_recipe(args.recipe, args.overrides), args.nodes, args.gpus_per_node, args.gpu_memory_gib,
                         args.ranks, check_inputs=not args.skip_inputs, recipe=args.recipe)
        if args.json:
            Path(args.json).write_text(json.dumps(report.as_dict()))
        return report

    def done(report):
        from elastic_megatron.jobs.dry_run import render

        failures.append(len(report.failures))
        return render(report)

    code = run_tool(args, job, done)
    if code == 0 and failures[0]:
        print(f"error: the dry run of {args.recipe} on {args.nodes * args.gpus_per_node} GPUs found {failures[0]} "
              "failure(s): the FAIL lines above", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
