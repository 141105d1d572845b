"""Export one of our checkpoints as a Hugging Face Nemotron-H directory that transformers'
NemotronHForCausalLM loads with no custom code (released Nemotron 3 Nano layout).

    python tools/export_hf.py --source-checkpoint runs/demo-pretrain --target-checkpoint hf/demo

An elastic checkpoint exports its full model; use tools/zero_shot_slicing.py --format hf
for a nested size. Streams tensor by tensor into 5 GB safetensors shards. The directory
carries config.json in both Nemotron-H conventions (`layers_block_type` and
`hybrid_override_pattern` + `num_hidden_layers`), generation_config.json and the tokenizer the
checkpoint was trained with (--tokenizer-dir to give another).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--source-checkpoint", required=True, help="run dir or iter_* checkpoint dir")
    parser.add_argument("--target-checkpoint", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--precision", default="bf16", help="bf16 or fp32")
    parser.add_argument("--tokenizer-dir", default=None, help="carry the tokenizer of this directory (default: the one the checkpoint records)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty target")
    args = parser.parse_args(argv)

    from elastic_megatron.convert.hf_checkpoint import export_hf

    return run_tool(args, lambda: export_hf(args.source_checkpoint, args.target_checkpoint, args.precision, args.overwrite,
                                      args.tokenizer_dir),
                    lambda out: f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
