"""Import a Hugging Face Nemotron-H checkpoint (config.json + safetensors shards, the
layout of the released Nemotron 3 Nano) as our Megatron checkpoint.

    python tools/import_hf.py --hf-dir /models/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 \
        --target-checkpoint checkpoints/nano-30b --name nemotron_nano_v3_30b

Writes <target>/checkpoints/iter_0000000 (loadable as elastic.parent_checkpoint or
run.init_checkpoint) and <target>/recipes/model/<name>.yaml. Streams tensor by tensor.
config.json may name its layers either way (`layers_block_type`, or the released
`hybrid_override_pattern` + `num_hidden_layers`); the tokenizer files are kept in
<target>/tokenizer, and every later export and slice carries them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face Nemotron-H directory")
    parser.add_argument("--target-checkpoint", required=True, help="output run directory (must not exist or be empty)")
    parser.add_argument("--name", default="nemotron_h_import", help="model name (and recipe file name)")
    parser.add_argument("--precision", default="bf16", help="bf16 or fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty target")
    args = parser.parse_args(argv)

    from elastic_megatron.convert.hf_checkpoint import import_hf

    return run_tool(args, lambda: import_hf(args.hf_dir, args.target_checkpoint, args.precision, args.name, args.overwrite),
                    lambda out: f"wrote {out} (model recipe: {out}/recipes/model/{args.name}.yaml)")


if __name__ == "__main__":
    sys.exit(main())
