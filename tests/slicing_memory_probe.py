"""Subprocess helper of test_slicing.py's memory test (a fresh process per measurement).

    python tests/slicing_memory_probe.py make <run dir>     write a ~360 MB elastic checkpoint, streaming
    python tests/slicing_memory_probe.py slice <run dir> <target>
        slice it (megatron + hf) and print JSON: peak RSS growth during slicing, sizes
"""

from __future__ import annotations

import json
import resource
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.config.model import ModelConfig  # noqa: E402
from elastic_megatron.convert.tensors import TensorSource  # noqa: E402
from elastic_megatron.elastic.widths import Widths, full_widths  # noqa: E402

CFG = ModelConfig(
    name="probe", hybrid_pattern="MEMEM*EMEME", hidden_size=512, vocab_size=4096, num_attention_heads=8,
    num_query_groups=2, kv_channels=64, mamba_num_heads=16, mamba_head_dim=64, mamba_state_dim=64,
    mamba_num_groups=2, ffn_hidden_size=1024, moe_num_experts=16, moe_router_topk=2, moe_ffn_hidden_size=1024,
    moe_shared_expert_ffn_hidden_size=1024,
)
HALF = Widths(hidden=384, attn_heads=4, mamba_heads=8, mamba_head_dim=64, ffn=1024, moe_ffn=512, moe_experts=8, shared_ffn=512)


class RandomSource(TensorSource):
    """Every tensor of CFG's flat naming, random, made on request (never all at once)."""

    def __init__(self):
        from elastic_megatron.models.counter import parameter_inventory

        self.shapes = {e.name: e.shape for e in parameter_inventory(CFG)}
        for i, s in enumerate(CFG.hybrid_pattern):
            if s == "E":
                self.shapes[f"decoder.layers.{i}.mlp.router.expert_bias"] = (CFG.moe_num_experts,)

    def names(self):
        return list(self.shapes)

    def _get(self, name, meta):
        if meta:
            return torch.empty(self.shapes[name], device="meta")
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return 0.02 * torch.randn(self.shapes[name], generator=gen)


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    mode, run_dir = sys.argv[1], Path(sys.argv[2])
    from elastic_megatron.convert.megatron_dist import config_yaml, write_dist_checkpoint
    from checkpoint_helpers import identity_index

    if mode == "make":
        budgets = [{"name": "full", "widths": full_widths(CFG).as_dict()}, {"name": "half", "widths": HALF.as_dict()}]
        meta = {"config": config_yaml(CFG), "sort_index": identity_index(CFG).to_lists(), "elastic": {"budgets": budgets}}
        write_dist_checkpoint(run_dir, CFG, RandomSource(), meta)
        return
    from elastic_megatron.slicing.zero_shot import slice_checkpoint

    src = RandomSource()
    largest = max(torch.Size(s).numel() * 4 for s in src.shapes.values())
    largest_stacked = max(4 * CFG.moe_num_experts * CFG.moe_ffn_hidden_size * CFG.hidden_size, largest)
    before = peak_bytes()
    slice_checkpoint(run_dir, Path(sys.argv[3]), "half", precision="fp32", fmt="both")
    after = peak_bytes()
    ckpt = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    print(json.dumps({"growth": after - before, "baseline": before, "checkpoint_bytes": ckpt,
                      "largest_tensor": largest, "largest_stacked": largest_stacked}))


if __name__ == "__main__":
    main()
