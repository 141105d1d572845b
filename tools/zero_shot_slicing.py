"""Slice one nested size out of an elastic checkpoint as a standalone checkpoint.

    python tools/zero_shot_slicing.py --source-checkpoint runs/demo-stage2 \
        --target-checkpoint runs/demo-small --size small --precision bf16 --format both

The output has real reduced shapes and its own config: `--format megatron` writes our
checkpoint plus recipes/model/<name>.yaml (train it further with
`hydra.searchpath=[file://<target>/recipes] model=<name> run.init_checkpoint=<target>`),
`--format hf` a directory transformers' NemotronHForCausalLM loads, `--format both` the
first with the second under hf/. Tensor by tensor, on CPU, with a progress bar.

`--precision fp8|nvfp4` slices a quantized model with the parent's scales: those of a QAD
checkpoint (recipes/qad.yaml), or post-training quantization of a BF16 elastic checkpoint
calibrated here (`--calibration-batches` of its training data, at every budget). The HF
export is ModelOpt's unified format (packed weights, `weight_scale`, `weight_scale_2`,
`input_scale`, hf_quant_config.json), which vLLM and TensorRT-LLM load. Every quantized
GEMM dimension of the slice is checked against the serving kernels' alignment (FP8: multiples
of 16, NVFP4: of 32; quant/recipes.py says where each rule comes from) before anything is
written; tools/describe_model.py storage=true lists which budgets qualify.

An HF export carries config.json in both Nemotron-H conventions, generation_config.json and
the tokenizer the checkpoint was trained with (tokenizer.json + tokenizer_config.json; a byte
model gets the equivalent tokenizer.json), so `AutoTokenizer.from_pretrained` and the serving
engines start from the directory alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--source-checkpoint", required=True, help="elastic run dir or iter_* checkpoint dir")
    parser.add_argument("--target-checkpoint", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--size", required=True, help="budget name recorded in the checkpoint (e.g. 23B)")
    parser.add_argument("--precision", default="bf16", help="bf16, fp32, fp8 or nvfp4")
    parser.add_argument("--recipe", default=None,
                        help="fp8/nvfp4: ModelOpt Nemotron-H recipe, aggressive or conservative (default: the checkpoint's "
                             "QAD recipe, else aggressive)")
    parser.add_argument("--calibration-batches", type=int, default=16,
                        help="fp8/nvfp4 from a BF16 checkpoint: micro-batches of PTQ calibration (default 16)")
    parser.add_argument("--format", default="megatron", help="megatron, hf or both")
    parser.add_argument("--name", default=None, help="model name of the slice (default <parent>_<size>)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="HF export: carry the tokenizer of this directory (default: the one the checkpoint records)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty target")
    args = parser.parse_args(argv)

    from elastic_megatron.slicing.zero_shot import slice_checkpoint

    def job():
        from elastic_megatron.config.errors import require_choice, require_positive_int
        from elastic_megatron.config.quant import QUANT_RECIPES

        if args.recipe is not None:
            require_choice("--recipe", args.recipe, QUANT_RECIPES)
        require_positive_int("--calibration-batches", args.calibration_batches)
        return slice_checkpoint(args.source_checkpoint, args.target_checkpoint, args.size, args.precision, args.format,
                                args.overwrite, name=args.name, recipe=args.recipe, calibration_batches=args.calibration_batches,
                                tokenizer_dir=args.tokenizer_dir)

    return run_tool(args, job, lambda out: f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
