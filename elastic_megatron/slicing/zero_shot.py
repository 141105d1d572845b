"""Zero-shot slicing: one nested size of an elastic checkpoint as a standalone checkpoint.

The elastic checkpoint records the importance sort it was trained from (`sort_index`)
and the resolved architecture of every budget (`elastic.budgets[*].widths`). Its weights
are already in importance order, so a budget is the prefix of every axis: the same
re-indexing rules as sorting (elastic/reindex.py), applied lazily tensor by tensor to a
`DistCheckpointSource`, written with real reduced shapes and an updated config.

Quantized slices (`precision` fp8 / nvfp4) use ONE set of scales, the parent's: those a
QAD checkpoint carries, or post-training quantization of a BF16 checkpoint (calibrated
here at every budget). The HF export quantizes each parent weight once and keeps the
budget's sub-blocks (quant/export.py); the Megatron checkpoint keeps the BF16 master
weights with the scales in its metadata (as ModelOpt's Megatron checkpoints do), which
the trainer, the evaluator and a further slice read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.convert.megatron_dist import DistCheckpointSource
from elastic_megatron.convert.output import (
    FORMATS, QUANTIZED, check_target, export_tokenizer, precision_dtype, staged, write_hf, write_megatron,
)
from elastic_megatron.elastic.reindex import prefix_index, reindex_source
from elastic_megatron.elastic.budgets import recorded_budget
from elastic_megatron.elastic.widths import model_cost, sub_model_config


def slice_checkpoint(source: str | Path, target: str | Path, size: str, precision: str = "bf16",
                     fmt: str = "megatron", overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
                     name: Optional[str] = None, recipe: Optional[str] = None, calibration_batches: int = 16,
                     scales: Optional[dict] = None, tokenizer_dir: Optional[str | Path] = None) -> Path:
    """Write budget `size` of elastic checkpoint `source` as a standalone checkpoint.

    fmt: megatron (our checkpoint + recipes/model/<name>.yaml), hf (a transformers
    directory), or both (megatron layout with the HF export under hf/). precision fp8 /
    nvfp4: `scales` (a quant record of the parent) if given, else the source's scales of
    that format, else PTQ with `calibration_batches`; `recipe`: ModelOpt's Nemotron-H recipe
    (default: the one the checkpoint's scales were trained with, else aggressive); every
    quantized GEMM dimension of the slice is checked against the serving kernels' alignment
    (quant/recipes.py) before anything is written. The HF export carries the tokenizer of
    `tokenizer_dir`, else the one the checkpoint records."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"allowed: {list(FORMATS)}")
    dtype = precision_dtype(precision, quantized_ok=True)
    target = check_target(target, overwrite)
    src = DistCheckpointSource(source)
    widths = recorded_budget(src.meta, size, source)
    sub_cfg = sub_model_config(src.cfg, widths, name=name or f"{src.cfg.name}_{size}")
    index = prefix_index(src.cfg, widths)
    sliced = reindex_source(src.cfg, index, src)
    provenance = {"sliced_from": {"checkpoint": str(src.dir), "size": size, "widths": widths.as_dict(),
                                  "total_params": int(model_cost(src.cfg, widths, "total_params")),
                                  "active_params": int(model_cost(src.cfg, widths, "active_params"))}}
    if src.meta.get("data"):  # the tokenizer it was trained with: evaluation refuses data tokenized otherwise
        provenance["data"] = src.meta["data"]
    hf_options = {"tokenizer": export_tokenizer(src.dir, src.meta, sub_cfg, tokenizer_dir) if fmt != "megatron" else None}
    if precision in QUANTIZED:
        from elastic_megatron.quant.export import EncodedSource, hf_quantized_view, slice_encoded, sliced_record, write_quant_configs
        from elastic_megatron.quant.recipes import check_kernel_alignment

        found = src.meta.get("quantization") or {}
        recipe = (recipe or (scales or {}).get("recipe") or (found.get("recipe") if found.get("format") == precision else None)
                  or "aggressive")
        check_kernel_alignment(src.cfg, sub_cfg, precision, recipe, size)
        record = scales or source_scales(src, precision, recipe, calibration_batches)
        provenance["quantization"] = sliced_record(src.cfg, index, record)
        encoded = slice_encoded(src.cfg, index, EncodedSource(src, record))
        hf_options.update(adapt=lambda view: hf_quantized_view(view, encoded, precision),
                          finish=lambda d: write_quant_configs(d, sub_cfg, provenance["quantization"]))
    with staged(target, overwrite) as tmp:
        if fmt in ("megatron", "both"):
            write_megatron(tmp, sub_cfg, sliced, dtype, **provenance)
        if fmt in ("hf", "both"):
            write_hf(tmp / "hf" if fmt == "both" else tmp, sub_cfg, encoded if precision in QUANTIZED else sliced, dtype,
                     max_shard_bytes=max_shard_bytes, **hf_options)
    return target


def source_scales(src: DistCheckpointSource, precision: str, recipe: str, calibration_batches: int) -> dict:
    """The scales of a quantized slice: the checkpoint's own (QAD, or an earlier PTQ)
    when it carries that format and recipe, else post-training quantization."""
    from elastic_megatron.quant.calibrate import ptq_scales

    found = src.meta.get("quantization")
    if found and found.get("format") == precision:
        if found.get("recipe") != recipe:
            raise ConfigError("--recipe", recipe, f"the checkpoint was quantization-trained with recipe {found.get('recipe')!r}; "
                              "slice it with that recipe")
        return found
    return ptq_scales(src.dir, precision, recipe, calibration_batches)
