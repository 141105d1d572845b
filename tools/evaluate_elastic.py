"""Held-out evaluation of a checkpoint: loss, perplexity and bits per byte per budget.

    # an elastic checkpoint's budgets next to the sorted-parent slice (a) and the unsorted prefix (b)
    python tools/evaluate_elastic.py --checkpoint runs/demo-stage2 --sorted runs/demo-importance \
        --unsorted runs/demo-pretrain --out runs/demo-eval
    # any data written by tools/preprocess_data.py with the checkpoint's tokenizer
    python tools/evaluate_elastic.py --checkpoint runs/demo-stage2 --data data/heldout_text_document \
        --seq-length 512 --budgets small,full --out runs/eval-heldout
    # a plain checkpoint (a parent, a separately distilled baseline) or a sliced one: the same code
    python tools/evaluate_elastic.py --checkpoint runs/demo-small --data data/heldout_text_document --out runs/eval-small

--checkpoint takes an elastic run dir (one row per budget), a plain run dir (one row,
`full`), a sliced checkpoint (one row, the budget it was cut at) or a Hugging Face
directory (one row; an FP8/NVFP4 export runs quantized, with its own scales; give --data). Without --data the
validation split of the checkpoint's own training data is read (--batches, default 16);
with it, the whole dataset at --seq-length (default: the run's), or its first --batches.
Prints the table and writes <out>/evaluation.json and <out>/evaluation.png. With
`--quantized` (and `--qad <QAD run dir>`), also the table per budget x precision: BF16,
FP8 and NVFP4 post-training quantization of the elastic checkpoint, NVFP4 after QAD
(<out>/precision.json, <out>/precision.png). Every input is checked before a model is
built; nothing is written when one is wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--checkpoint", "--elastic", dest="checkpoint", required=True,
                        help="elastic, plain or sliced checkpoint (run dir or checkpoint dir); --elastic is an alias")
    parser.add_argument("--sorted", default=None, help="sorted parent (importance run dir): baseline (a), masked at the budgets")
    parser.add_argument("--unsorted", default=None, help="parent before sorting: baseline (b), masked at the budgets")
    parser.add_argument("--out", required=True, help="directory for evaluation.json and evaluation.png")
    parser.add_argument("--data", default=None, help="indexed dataset prefix (tools/preprocess_data.py) to evaluate on, read whole")
    parser.add_argument("--seq-length", type=int, default=None, help="with --data: tokens per sequence (default: the run's)")
    parser.add_argument("--batches", type=int, default=None,
                        help="micro-batches to evaluate (default: 16 of the run's validation split; with --data, one pass)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--budgets", default=None, help="comma-separated budget names to evaluate (default: all)")
    parser.add_argument("--quantized", action="store_true", help="also the budget x precision table (FP8/NVFP4 PTQ)")
    parser.add_argument("--qad", default=None, help="NVFP4 QAD run dir for the precision table (implies --quantized)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="PTQ calibration micro-batches (default 16)")
    args = parser.parse_args(argv)

    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.jobs.evaluate import (
        checkpoint_rows, eval_data, evaluate, evaluate_precisions, render_precision_table, render_rows, write_precision_outputs,
        write_rows,
    )
    from elastic_megatron.parallel.setup import distributed

    def job():
        from elastic_megatron.config.errors import require_positive_int
        from elastic_megatron.inference.loading import open_for_inference

        if args.batches is not None:
            require_positive_int("--batches", args.batches)
        require_positive_int("--micro-batch-size", args.micro_batch_size)
        require_positive_int("--calibration-batches", args.calibration_batches)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ConfigError("--out", args.out, "is a file; give a directory for evaluation.json and evaluation.png")
        open_for_inference(args.checkpoint)  # a readable checkpoint (ours or an HF directory), before anything else
        names = [n.strip() for n in args.budgets.split(",") if n.strip()] if args.budgets else None
        checkpoint_rows(args.checkpoint, names)
        baselines = {k: v for k, v in (("sorted", args.sorted), ("unsorted", args.unsorted)) if v}
        with distributed(1, 1, 1, seed=1234):
            data = eval_data(args.checkpoint, args.data, args.seq_length, args.batches, args.micro_batch_size)
            rows = evaluate(args.checkpoint, data, names, baselines)
            table = None
            if args.quantized or args.qad:
                table = evaluate_precisions(args.checkpoint, data, args.qad, args.micro_batch_size, args.calibration_batches)
            return rows, data.source, table

    def done(result):
        rows, source, table = result
        json_path, png_path = write_rows(rows, args.out, source)
        text = f"{render_rows(rows, source)}\nwrote {json_path} and {png_path}"
        if table is not None:
            pj, pp = write_precision_outputs(table, args.out)
            text += f"\n\n{render_precision_table(table)}\nwrote {pj} and {pp}"
        return text

    return run_tool(args, job, done)


if __name__ == "__main__":
    sys.exit(main())
