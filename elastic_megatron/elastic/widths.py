"""Width axes of an elastic model, the architecture of one nested model, and its cost.

A nested model is the parent with a prefix of every (importance-sorted) width axis kept:

| axis            | unit                                   | must divide by            |
|-----------------|----------------------------------------|---------------------------|
| hidden          | embedding / residual channels          | -                         |
| attn_heads      | attention query heads (all groups)     | num_query_groups          |
| mamba_heads     | Mamba2 heads (all groups)              | mamba_num_groups          |
| mamba_head_dim  | channels of every Mamba2 head          | -                         |
| ffn             | dense MLP channels ('-' layers)        | -                         |
| moe_ffn         | channels of every routed expert        | -                         |
| moe_experts     | routed experts per MoE layer           | (>= moe_router_topk)      |
| shared_ffn      | shared-expert channels                 | -                         |

Heads are kept per group: `attn_heads = 24` with 2 query groups keeps the first 12 heads
of each group, so grouped-query attention and Mamba's B/C groups stay intact. Query
groups, Mamba groups, the state size and the vocabulary never shrink.

Every axis but `hidden` may also be heterogeneous: a tuple with one width per layer that
has the axis, in pattern order (attention axes over '*' layers, Mamba axes over 'M'
layers, ffn over '-' layers, MoE axes over 'E' layers). Such a nested model exists as
masks of the parent; it has no uniform Megatron config (`sub_model_config` refuses it).

`model_cost` is the analytic counter (models/counter.py) in closed form: a multilinear
polynomial of the widths. It accepts floats or tensors, so the router differentiates
the expected cost of its width distribution through it; for integer widths it equals
the counter, and the tests hold it to that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from elastic_megatron.config.parallel import expert_tensor_parallel

AXES = ("hidden", "attn_heads", "mamba_heads", "mamba_head_dim", "ffn", "moe_ffn", "moe_experts", "shared_ffn")
TARGET_KINDS = ("total_params", "active_params", "memory_bytes")

Number = Union[int, float, torch.Tensor]


PerLayer = Union[int, tuple]


@dataclass(frozen=True)
class Widths:
    """Integer widths of one nested model (totals over groups, see the module table);
    a tuple on an axis = one width per layer that has the axis."""

    hidden: int
    attn_heads: PerLayer
    mamba_heads: PerLayer
    mamba_head_dim: PerLayer
    ffn: PerLayer
    moe_ffn: PerLayer
    moe_experts: PerLayer
    shared_ffn: PerLayer

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists (from YAML/JSON) become tuples
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **kw) -> "Widths":
        return dataclasses.replace(self, **kw)

    @property
    def heterogeneous(self) -> bool:
        return any(isinstance(getattr(self, a), tuple) for a in AXES)


# Axis -> the ModelConfig field that holds the parent's width on that axis.
AXIS_FIELDS = {
    "hidden": "hidden_size",
    "attn_heads": "num_attention_heads",
    "mamba_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
    "ffn": "ffn_hidden_size",
    "moe_ffn": "moe_ffn_hidden_size",
    "moe_experts": "moe_num_experts",
    "shared_ffn": "moe_shared_expert_ffn_hidden_size",
}


def full_widths(cfg: ModelConfig) -> Widths:
    return Widths(**{axis: getattr(cfg, f) for axis, f in AXIS_FIELDS.items()})


def axes_in_use(cfg: ModelConfig) -> tuple[str, ...]:
    """Axes that exist in this model's pattern (a model without '-' layers has no ffn axis)."""
    used = ["hidden"]
    if cfg.count(ATTENTION):
        used.append("attn_heads")
    if cfg.count(MAMBA):
        used += ["mamba_heads", "mamba_head_dim"]
    if cfg.count(MLP):
        used.append("ffn")
    if cfg.count(MOE):
        used += ["moe_ffn", "moe_experts"]
        if cfg.moe_shared_expert_ffn_hidden_size:
            used.append("shared_ffn")
    return tuple(used)


# Which layers carry each axis (the per-layer axes are indexed over these layers).
AXIS_LAYER_SYMBOL = {"attn_heads": ATTENTION, "mamba_heads": MAMBA, "mamba_head_dim": MAMBA, "ffn": MLP,
                     "moe_ffn": MOE, "moe_experts": MOE, "shared_ffn": MOE}


def axis_layers(cfg: ModelConfig, axis: str) -> int:
    """Number of layers that carry a per-layer axis."""
    return cfg.count(AXIS_LAYER_SYMBOL[axis])


def width_at(value, k: int):
    """The width of the k-th layer carrying the axis: value[k] for per-layer values (tuple,
    list or a 1-D tensor), value itself otherwise."""
    if isinstance(value, (tuple, list)) or (torch.is_tensor(value) and value.dim() > 0):
        return value[k]
    return value


def axis_group_count(cfg: ModelConfig, axis: str) -> int:
    """Candidates of an axis must be multiples of this (heads are kept per group)."""
    return {"attn_heads": cfg.num_query_groups, "mamba_heads": cfg.mamba_num_groups}.get(axis, 1)


def check_width(cfg: ModelConfig, axis: str, value, key: str, parallel=None) -> None:
    """One candidate width: positive, at most the parent's, divisible as the axis and the
    parallel layout `parallel` (tp, ep, etp) require."""
    full = getattr(full_widths(cfg), axis)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= full:
        raise ConfigError(key, value, f"must be an integer between 1 and the parent's {axis}={full}")
    groups = axis_group_count(cfg, axis)
    if value % groups:
        what = "query groups" if axis == "attn_heads" else "Mamba groups"
        raise ConfigError(key, value, f"{axis} is kept per group: must be a multiple of the {groups} {what}")
    tp, ep, etp = (1, 1, 1) if parallel is None else (parallel.tp, parallel.ep, expert_tensor_parallel(parallel))
    sharded_by = {"attn_heads": ("tp", tp), "mamba_heads": ("tp", tp), "ffn": ("tp", tp), "shared_ffn": ("tp", tp),
                  "moe_ffn": ("etp", etp), "moe_experts": ("ep", ep)}
    if axis in sharded_by:
        name, n = sharded_by[axis]
        if n > 1 and value % n:
            why = (f"each TP rank must keep the same number of active heads ({axis} is sharded over parallel.tp)"
                   if axis in ("attn_heads", "mamba_heads") else
                   f"breaks per-shard balance: the nested model must split evenly over parallel.{name} to run under this layout")
            raise ConfigError(key, value, f"must be divisible by parallel.{name}={n}: {why}")
    if axis == "moe_experts" and value < cfg.moe_router_topk:
        raise ConfigError(key, value, f"must be >= model.moe_router_topk={cfg.moe_router_topk}")


def sub_model_config(cfg: ModelConfig, w: Widths, name: str | None = None) -> ModelConfig:
    """The ModelConfig of the nested model with widths `w` (real, smaller shapes)."""
    if w.heterogeneous:
        raise ConfigError("widths", w.as_dict(), "per-layer widths have no uniform model config; slice a uniform budget")
    return dataclasses.replace(
        cfg,
        name=name or f"{cfg.name}[{w.hidden}]",
        kv_channels=cfg.head_dim,  # head width never changes, so pin it before hidden shrinks
        **{f: getattr(w, axis) for axis, f in AXIS_FIELDS.items()},
    )


def model_cost(cfg: ModelConfig, w, kind: str = "total_params") -> Number:
    """Parameters (total or active) or bf16 weight bytes of the nested model with widths `w`.

    `w` is a Widths or any object with the axis attributes / a mapping axis -> number or
    tensor; the result is then a tensor that carries gradients to the widths."""
    if kind not in TARGET_KINDS:
        raise ConfigError("elastic.budgets.target_kind", kind, f"allowed: {list(TARGET_KINDS)}")
    raw = (lambda a: w[a]) if isinstance(w, dict) else (lambda a: getattr(w, a))
    seen = {symbol: 0 for symbol in (ATTENTION, MAMBA, MLP, MOE)}
    h = raw("hidden")
    v = cfg.vocab_size
    total = 2 * v * h + h  # embedding, output layer, final norm
    for symbol in cfg.hybrid_pattern:
        k = seen[symbol]
        seen[symbol] += 1

        def get(axis):
            return width_at(raw(axis), k)

        total = total + h  # the layer's norm
        if symbol == MAMBA:
            nh, hd = get("mamba_heads"), get("mamba_head_dim")
            di = nh * hd
            gd = cfg.mamba_num_groups * cfg.mamba_state_dim
            total = total + (2 * di + 2 * gd + nh) * h  # in_proj
            total = total + (di + 2 * gd) * (cfg.mamba_conv_kernel + 1)  # conv1d weight + bias
            total = total + 3 * nh + di + h * di  # dt_bias, A_log, D, gated norm, out_proj
        elif symbol == ATTENTION:
            nh, hd = get("attn_heads"), cfg.head_dim
            total = total + (nh + 2 * cfg.num_query_groups) * hd * h + h * nh * hd
        elif symbol == MLP:
            total = total + 2 * get("ffn") * h
        elif symbol == MOE:
            experts = cfg.moe_router_topk if kind == "active_params" else get("moe_experts")
            total = total + get("moe_experts") * h  # router
            total = total + experts * 2 * get("moe_ffn") * h
            if cfg.moe_shared_expert_ffn_hidden_size:
                total = total + 2 * get("shared_ffn") * h
    if kind == "memory_bytes":
        return 2 * total
    return total
