"""Calibration of an elastic model: the activation scales are the max over the
calibration batches run at *every* budget, so the one set of scales covers each nested
model's activations (the weight scales are the parent's, whatever the budget)."""

from __future__ import annotations

from typing import Optional

import torch

from elastic_megatron.elastic.masks import ElasticHooks, hard_masks
from elastic_megatron.elastic.widths import Widths
from elastic_megatron.quant.hooks import QuantHooks


def calibrate_budgets(model, cfg, quant: QuantHooks, budgets: list[tuple[str, Widths]], batches: list[dict],
                      elastic: Optional[ElasticHooks] = None) -> None:
    """Max-calibrate `quant` on `batches` at each budget (hard masks through `elastic`, or
    hooks attached for the occasion). Forward only, in eval mode, on a single pipeline stage."""
    own = elastic is None
    elastic = elastic or ElasticHooks(model, cfg)
    was_training = model.training
    model.eval()

    def forward_loop():
        for _, w in budgets:
            elastic.set(hard_masks(cfg, w))
            for b in batches:
                model(b["tokens"], b["position_ids"], None)

    try:
        with torch.no_grad():
            quant.calibrate(forward_loop)
    finally:
        elastic.set(None)
        if own:
            elastic.remove()
        model.train(was_training)


def budget_axis_widths(budgets: list[tuple[str, Widths]]) -> dict[str, list[int]]:
    """axis -> every width the budgets take on it (per-layer widths flattened)."""
    out: dict[str, set] = {}
    for _, w in budgets:
        for axis, v in w.as_dict().items():
            values = v if isinstance(v, (list, tuple)) else [v]
            out.setdefault(axis, set()).update(int(x) for x in values)
    return {a: sorted(v) for a, v in out.items()}


def ptq_scales(checkpoint, fmt: str, recipe: str = "aggressive", num_batches: int = 16, micro_batch_size: int = 8,
               key: str = "--precision") -> dict:
    """Post-training quantization of a BF16 checkpoint: its scales (a `QuantHooks.record`),
    max-calibrated on `num_batches` micro-batches of the training data its run recorded, at
    every budget it records (the full model for a plain checkpoint)."""
    import yaml

    from elastic_megatron.checkpoint.metadata import checkpoint_model_config
    from elastic_megatron.checkpoint.store import load_model_weights
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.data.datasets import recorded_batches
    from elastic_megatron.elastic.budgets import recorded_budgets
    from elastic_megatron.elastic.widths import full_widths
    from elastic_megatron.models.hybrid import build_model
    from elastic_megatron.parallel.setup import distributed
    from elastic_megatron.quant.recipes import check_block_alignment

    cfg, meta = checkpoint_model_config(checkpoint)
    budgets = recorded_budgets(meta, checkpoint) if (meta.get("elastic") or {}).get("budgets") else [("full", full_widths(cfg))]
    check_block_alignment(cfg, fmt, recipe, budget_axis_widths(budgets), key)
    job = yaml.safe_load(meta.get("config") or "{}") or {}
    if "data" not in job or "run" not in job:
        raise ConfigError(key, fmt, f"post-training quantization calibrates on the training data of the run that wrote "
                          f"{checkpoint}, and this checkpoint records none (an import or a slice): quantize the elastic "
                          "checkpoint it came from")
    with distributed(1, 1, 1, seed=job["run"].get("seed", 1234)):
        model = build_model(cfg)
        load_model_weights(checkpoint, model)
        quant = QuantHooks(model, fmt, recipe)
        calibrate_budgets(model, cfg, quant, budgets, recorded_batches(job, num_batches, micro_batch_size, "train"))
        return quant.record()
