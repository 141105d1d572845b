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
