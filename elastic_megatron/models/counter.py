"""Analytic parameter and checkpoint-size counter, from a ModelConfig alone.

`parameter_inventory` lists every parameter the `local` backend instantiates, with its
Megatron name and shape, without allocating anything; totals, active parameters
(what one token touches: the top-k routed experts instead of all of them) and bytes per
precision are sums over that list. Elastic budgets and slicing reuse it on sub-configs.

Precision accounting (tensor bytes of a checkpoint in ModelOpt's unified HF format, as
quant/export.py writes it):
- bf16: 2 bytes for every tensor.
- fp8:  quantised linear weights at 1 byte per element plus two fp32 per-tensor scales
        (weight_scale, input_scale); everything else bf16.
- nvfp4: quantised linear weights at 4 bits per element, one FP8 (E4M3) weight_scale per
        block of 16 input channels, plus two fp32 per-tensor scales (weight_scale_2,
        input_scale); everything else bf16.
Quantised (the default, `aggressive`, recipe of ModelOpt for Nemotron-H, which
elastic_megatron/quant/recipes.py applies and the quantized exports write): the Mamba
in/out projections, dense MLP, routed and shared experts. Kept in bf16: attention
(linear_qkv, linear_proj), embeddings, output layer, norms, MoE router, conv1d, A_log,
D, dt_bias. The `conservative` recipe (Mamba projections in bf16 too) is not counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig

PRECISIONS = ("bf16", "fp8", "nvfp4")
NVFP4_BLOCK = 16


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    component: str  # embedding | output | norm | mamba | attention | mlp | router | expert | shared_expert
    layer: Optional[int] = None
    expert: Optional[int] = None
    quantizable: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _layer_entries(cfg: ModelConfig, i: int, symbol: str) -> Iterable[ParamEntry]:
    h = cfg.hidden_size
    p = f"decoder.layers.{i}."

    def e(name, shape, component, **kw):
        return ParamEntry(p + name, tuple(shape), component, layer=i, **kw)

    if symbol == MAMBA:
        d_inner, gd = cfg.mamba_d_inner, cfg.mamba_num_groups * cfg.mamba_state_dim
        conv_dim = d_inner + 2 * gd
        yield e("norm.weight", (h,), "norm")
        yield e("mixer.in_proj.weight", (2 * d_inner + 2 * gd + cfg.mamba_num_heads, h), "mamba", quantizable=True)
        yield e("mixer.conv1d.weight", (conv_dim, 1, cfg.mamba_conv_kernel), "mamba")
        yield e("mixer.conv1d.bias", (conv_dim,), "mamba")
        for name in ("dt_bias", "A_log", "D"):
            yield e(f"mixer.{name}", (cfg.mamba_num_heads,), "mamba")
        yield e("mixer.norm.weight", (d_inner,), "mamba")
        yield e("mixer.out_proj.weight", (h, d_inner), "mamba", quantizable=True)
    elif symbol == ATTENTION:
        hd, nh, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
        yield e("input_layernorm.weight", (h,), "norm")
        # Not quantized: ModelOpt's MAMBA_MOE_FP8_AGGRESSIVE_CFG and MAMBA_MOE_NVFP4_AGGRESSIVE_CFG
        # (like their CONSERVATIVE variants) disable the quantizers of linear_qkv and
        # linear_proj, so attention stays bf16 in a quantized checkpoint. The rule lives
        # here rather than through quant/recipes.py: models/ does not import quant/.
        yield e("self_attention.linear_qkv.weight", ((nh + 2 * ng) * hd, h), "attention")
        yield e("self_attention.linear_proj.weight", (h, nh * hd), "attention")
    elif symbol == MLP:
        yield e("pre_mlp_layernorm.weight", (h,), "norm")
        yield e("mlp.linear_fc1.weight", (cfg.ffn_hidden_size, h), "mlp", quantizable=True)
        yield e("mlp.linear_fc2.weight", (h, cfg.ffn_hidden_size), "mlp", quantizable=True)
    elif symbol == MOE:
        f = cfg.moe_ffn_hidden_size
        yield e("pre_mlp_layernorm.weight", (h,), "norm")
        yield e("mlp.router.weight", (cfg.moe_num_experts, h), "router")
        for x in range(cfg.moe_num_experts):
            yield e(f"mlp.experts.local_experts.{x}.linear_fc1.weight", (f, h), "expert", expert=x, quantizable=True)
            yield e(f"mlp.experts.local_experts.{x}.linear_fc2.weight", (h, f), "expert", expert=x, quantizable=True)
        if cfg.moe_shared_expert_ffn_hidden_size:
            s = cfg.moe_shared_expert_ffn_hidden_size
            yield e("mlp.shared_experts.linear_fc1.weight", (s, h), "shared_expert", quantizable=True)
            yield e("mlp.shared_experts.linear_fc2.weight", (h, s), "shared_expert", quantizable=True)


def parameter_inventory(cfg: ModelConfig) -> list[ParamEntry]:
    """Every parameter of the model, named as Megatron names them in the local backend."""
    h = cfg.hidden_size
    out = [ParamEntry("embedding.word_embeddings.weight", (cfg.vocab_size, h), "embedding")]
    for i, symbol in enumerate(cfg.hybrid_pattern):
        out.extend(_layer_entries(cfg, i, symbol))
    out.append(ParamEntry("decoder.final_norm.weight", (h,), "norm"))
    out.append(ParamEntry("output_layer.weight", (cfg.vocab_size, h), "output"))
    return out


def is_active(entry: ParamEntry, cfg: ModelConfig) -> bool:
    """A token touches every parameter except routed experts beyond its top-k. All experts
    of a layer have the same shape, so counting experts 0..k-1 gives the exact figure."""
    return entry.expert is None or entry.expert < cfg.moe_router_topk


def tensor_bytes(entry: ParamEntry, precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {list(PRECISIONS)}")
    if precision == "bf16" or not entry.quantizable:
        return 2 * entry.numel
    rows, cols = entry.shape
    if precision == "fp8":
        return entry.numel + 2 * 4
    # nvfp4: two 4-bit values per byte, an E4M3 scale per 16-channel block of each row.
    return math.ceil(entry.numel / 2) + rows * math.ceil(cols / NVFP4_BLOCK) + 2 * 4


@dataclass
class ModelSize:
    total_params: int
    active_params: int
    params_by_component: dict[str, int]
    active_by_component: dict[str, int]
    total_bytes: dict[str, int]
    active_bytes: dict[str, int]

    def as_dict(self) -> dict:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "params_by_component": self.params_by_component,
            "active_params_by_component": self.active_by_component,
            "total_bytes": self.total_bytes,
            "active_bytes": self.active_bytes,
        }


def model_size(cfg: ModelConfig) -> ModelSize:
    inventory = parameter_inventory(cfg)
    by_comp: dict[str, int] = defaultdict(int)
    active_comp: dict[str, int] = defaultdict(int)
    total_bytes = {p: 0 for p in PRECISIONS}
    active_bytes = {p: 0 for p in PRECISIONS}
    for entry in inventory:
        active = is_active(entry, cfg)
        by_comp[entry.component] += entry.numel
        if active:
            active_comp[entry.component] += entry.numel
        for p in PRECISIONS:
            b = tensor_bytes(entry, p)
            total_bytes[p] += b
            if active:
                active_bytes[p] += b
    return ModelSize(
        total_params=sum(by_comp.values()),
        active_params=sum(active_comp.values()),
        params_by_component=dict(by_comp),
        active_by_component=dict(active_comp),
        total_bytes=total_bytes,
        active_bytes=active_bytes,
    )
