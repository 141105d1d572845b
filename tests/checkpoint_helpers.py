"""Test-only helpers for checkpoint, conversion and slicing tests."""

from __future__ import annotations

import torch

from elastic_megatron.config.model import ModelConfig
from elastic_megatron.convert.tensors import TensorSource
from elastic_megatron.elastic.reindex import ModelIndex, prefix_index
from elastic_megatron.elastic.widths import full_widths


class DictSource(TensorSource):
    """An in-memory state dict as a source (tests, small models)."""

    def __init__(self, tensors: dict):
        self.tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def names(self) -> list[str]:
        return list(self.tensors)

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        t = self.tensors[name]
        return torch.empty(t.shape, dtype=t.dtype, device="meta") if meta else t


def identity_index(cfg: ModelConfig) -> ModelIndex:
    return prefix_index(cfg, full_widths(cfg))


def elastic_meta(cfg: ModelConfig, budgets: dict, **extra) -> dict:
    """Checkpoint metadata as an elastic run writes it (ElasticDistillStep.checkpoint_meta),
    for `budgets` (name -> Widths) over the identity sort."""
    from elastic_megatron.convert.megatron_dist import config_yaml
    from elastic_megatron.elastic.widths import model_cost

    return {"config": config_yaml(cfg), "sort_index": identity_index(cfg).to_lists(), **extra,
            "elastic": {"spec": "test", "budgets": [
                {"name": n, "target_kind": "total_params", "target": None, "widths": w.as_dict(),
                 "total_params": int(model_cost(cfg, w, "total_params")),
                 "active_params": int(model_cost(cfg, w, "active_params"))} for n, w in budgets.items()]}}
