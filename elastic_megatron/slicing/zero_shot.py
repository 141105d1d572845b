"""Zero-shot slicing: one nested size of an elastic checkpoint as a standalone checkpoint.

The elastic checkpoint records the importance sort it was trained from (`sort_index`)
and the resolved architecture of every budget (`elastic.budgets[*].widths`). Its weights
are already in importance order, so a budget is the prefix of every axis: the same
re-indexing rules as sorting (elastic/reindex.py), applied lazily tensor by tensor to a
`DistCheckpointSource`, written with real reduced shapes and an updated config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.convert.megatron_dist import DistCheckpointSource
from elastic_megatron.convert.output import FORMATS, check_target, precision_dtype, staged, write_hf, write_megatron
from elastic_megatron.elastic.reindex import prefix_index, reindex_source
from elastic_megatron.elastic.budgets import recorded_budget
from elastic_megatron.elastic.widths import model_cost, sub_model_config


def slice_checkpoint(source: str | Path, target: str | Path, size: str, precision: str = "bf16",
                     fmt: str = "megatron", overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
                     name: Optional[str] = None) -> Path:
    """Write budget `size` of elastic checkpoint `source` as a standalone checkpoint.

    fmt: megatron (our checkpoint + recipes/model/<name>.yaml), hf (a transformers
    directory), or both (megatron layout with the HF export under hf/)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"allowed: {list(FORMATS)}")
    dtype = precision_dtype(precision)
    target = check_target(target, overwrite)
    src = DistCheckpointSource(source)
    widths = recorded_budget(src.meta, size, source)
    sub_cfg = sub_model_config(src.cfg, widths, name=name or f"{src.cfg.name}_{size}")
    sliced = reindex_source(src.cfg, prefix_index(src.cfg, widths), src)
    provenance = {"sliced_from": {"checkpoint": str(src.dir), "size": size, "widths": widths.as_dict(),
                                  "total_params": int(model_cost(src.cfg, widths, "total_params")),
                                  "active_params": int(model_cost(src.cfg, widths, "active_params"))}}
    with staged(target, overwrite) as tmp:
        if fmt in ("megatron", "both"):
            write_megatron(tmp, sub_cfg, sliced, dtype, **provenance)
        if fmt in ("hf", "both"):
            write_hf(tmp / "hf" if fmt == "both" else tmp, sub_cfg, sliced, dtype, max_shard_bytes=max_shard_bytes)
    return target
