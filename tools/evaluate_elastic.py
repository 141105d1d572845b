"""Evaluation table of an elastic checkpoint: one row per nested budget, against the same
sizes sliced from the sorted parent (a) and prefix-sliced from the unsorted parent (b).

    python tools/evaluate_elastic.py --elastic runs/demo-stage2 --sorted runs/demo-importance \
        --unsorted runs/demo-pretrain --out runs/demo-eval

Prints the table and writes <out>/evaluation.json and <out>/evaluation.png. With
`--quantized` (and `--qad <QAD run dir>`), also the table per budget x precision: BF16,
FP8 and NVFP4 post-training quantization of the elastic checkpoint, NVFP4 after QAD
(<out>/precision.json, <out>/precision.png).
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
    parser.add_argument("--quantized", action="store_true", help="also the budget x precision table (FP8/NVFP4 PTQ)")
    parser.add_argument("--qad", default=None, help="NVFP4 QAD run dir for the precision table (implies --quantized)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="PTQ calibration micro-batches (default 16)")
    args = parser.parse_args(argv)

    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.jobs.evaluate import (
        evaluate_elastic, evaluate_precisions, render_precision_table, render_table, write_outputs, write_precision_outputs,
    )
    from elastic_megatron.parallel.setup import distributed

    def job():
        from elastic_megatron.config.errors import require_positive_int

        require_positive_int("--batches", args.batches)
        require_positive_int("--micro-batch-size", args.micro_batch_size)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ConfigError("--out", args.out, "is a file; give a directory for evaluation.json and evaluation.png")
        require_positive_int("--calibration-batches", args.calibration_batches)
        with distributed(1, 1, 1, seed=1234):
            rows = evaluate_elastic(args.elastic, args.sorted, args.unsorted, args.batches, args.micro_batch_size)
            table = None
            if args.quantized or args.qad:
                table = evaluate_precisions(args.elastic, args.qad, args.batches, args.micro_batch_size, args.calibration_batches)
            return rows, table

    def done(result):
        rows, table = result
        json_path, png_path = write_outputs(rows, args.out)
        text = f"{render_table(rows)}\nwrote {json_path} and {png_path}"
        if table is not None:
            pj, pp = write_precision_outputs(table, args.out)
            text += f"\n\n{render_precision_table(table)}\nwrote {pj} and {pp}"
        return text

    return run_tool(args, job, done)


if __name__ == "__main__":
    sys.exit(main())
