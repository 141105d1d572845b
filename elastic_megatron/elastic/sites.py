"""Where every width axis lives in a built model: one walk that the mask hooks
(masks.py) and the importance collector (importance.py) share, so a new layer type is
taught to both in one place.

| axis                | module (Megatron-Core 0.16, local spec)                        |
|---------------------|----------------------------------------------------------------|
| hidden              | every RMSNorm on the residual stream (`hidden_norms`)          |
| attn_heads          | the core attention of a '*' layer (output: heads x head_dim)   |
| mamba_heads / _dim  | the Mamba2 mixer of an 'M' layer (gated norm, out_proj)        |
| ffn                 | linear_fc2 of a '-' layer's MLP                                |
| moe_experts         | the TopKRouter of an 'E' layer                                 |
| moe_ffn, shared_ffn | linear_fc2 of every local expert / of the shared expert        |

`index` is the layer's position among the pattern's layers of its type (the k-th
Mamba layer, the k-th MoE layer...), counted over the whole pattern, so a pipeline
stage's layers keep the numbers they have in the full model: per-layer masks and
per-layer importance scores are indexed by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from elastic_megatron.models.norms import RMSNorm


@dataclass
class MoESites:
    router: torch.nn.Module
    experts: list = field(default_factory=list)  # local expert MLPs (each has linear_fc2)
    shared_fc2: Optional[torch.nn.Module] = None
    experts_module: Optional[torch.nn.Module] = None  # the container (SequentialMLP) of `experts`


@dataclass
class LayerSites:
    """The width sites of one decoder layer of this pipeline stage."""

    symbol: str  # the layer's pattern symbol: M, *, - or E
    index: int  # position among the pattern's layers of this symbol (pipeline offset included)
    mamba: Optional[torch.nn.Module] = None  # HybridMambaMixer
    core_attention: Optional[torch.nn.Module] = None
    mlp_fc2: Optional[torch.nn.Module] = None
    moe: Optional[MoESites] = None


def hidden_norms(model) -> list[RMSNorm]:
    """Every RMSNorm that reads the residual stream (layer norms and the final norm)."""
    return [m for m in model.modules() if type(m) is RMSNorm]


def _layer_sites(layer) -> LayerSites:
    if isinstance(layer, MambaLayer):
        return LayerSites(MAMBA, 0, mamba=layer.mixer)
    if not isinstance(layer, TransformerLayer):
        raise TypeError(f"unknown decoder layer type {type(layer).__name__}: teach elastic/sites.py its width sites")
    mlp = layer.mlp
    if isinstance(mlp, MoELayer):
        shared = mlp.shared_experts.linear_fc2 if mlp.shared_experts is not None else None
        return LayerSites(MOE, 0, moe=MoESites(mlp.router, list(mlp.experts.local_experts), shared, mlp.experts))
    if hasattr(mlp, "linear_fc2"):
        return LayerSites(MLP, 0, mlp_fc2=mlp.linear_fc2)
    if hasattr(layer.self_attention, "core_attention"):
        return LayerSites(ATTENTION, 0, core_attention=layer.self_attention.core_attention)
    raise TypeError("a TransformerLayer with neither attention nor an MLP: teach elastic/sites.py its width sites")


def layer_sites(model, cfg: ModelConfig) -> list[LayerSites]:
    """The width sites of every decoder layer of `model` (this pipeline stage), in order."""
    layers = model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    seen = {s: cfg.hybrid_pattern[:offset].count(s) for s in (MAMBA, ATTENTION, MLP, MOE)}
    out = []
    for position, layer in enumerate(layers):
        sites = _layer_sites(layer)
        expected = cfg.hybrid_pattern[offset + position]
        if sites.symbol != expected:
            raise ValueError(f"layer {offset + position} is a {sites.symbol!r} layer, the pattern says {expected!r}")
        sites.index = seen[sites.symbol]
        seen[sites.symbol] += 1
        out.append(sites)
    return out
