"""Re-index every tensor that touches a width axis: one rule set for sorting and slicing.

A `ModelIndex` says, per axis, which source positions the result keeps, in which order:
- sorting: a full permutation of every axis (importance order), same shapes;
- slicing: the first k positions of every (sorted) axis, smaller shapes.

Each axis reaches several tensors, sometimes through a fused layout; the rules here are
the one place that knows them (Megatron-Core's local-backend parameter names):

| tensor                         | dim 0                                  | dim 1     |
|--------------------------------|----------------------------------------|-----------|
| embedding, output_layer        | vocabulary (kept)                      | hidden    |
| every RMSNorm weight           | hidden                                 |           |
| mixer.in_proj                  | [z: head x chan | x: head x chan | B, C (kept) | dt: head] | hidden |
| mixer.conv1d weight, bias      | [x: head x chan | B, C (kept)]         |           |
| mixer.dt_bias, A_log, D        | head                                   |           |
| mixer.norm (gated group norm)  | head x chan                            |           |
| mixer.out_proj                 | hidden                                 | head x chan |
| self_attention.linear_qkv      | per query group [q heads x chan | k | v] | hidden  |
| self_attention.linear_proj     | hidden                                 | head x chan |
| mlp.linear_fc1 / linear_fc2    | ffn / hidden                           | hidden / ffn |
| mlp.router weight, expert_bias | expert                                 | hidden    |
| local_experts.{e}.fc1 / fc2    | expert e's moe_ffn / hidden (experts renumbered) | hidden / moe_ffn |
| shared_experts.fc1 / fc2       | shared_ffn / hidden                    | hidden / shared_ffn |

Heads are indexed within their group (attention query groups, Mamba groups): a group's
heads are permuted among themselves and kept as a per-group prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from elastic_megatron.elastic.widths import Widths

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


@dataclass
class LayerIndex:
    """Kept source positions of one layer's axes (None where the layer has no such axis)."""

    attn_heads: Optional[torch.Tensor] = None  # [query groups, kept per group], positions within the group
    mamba_heads: Optional[torch.Tensor] = None  # [Mamba groups, kept per group]
    mamba_head_dim: Optional[torch.Tensor] = None  # [kept channels], the same for every head
    ffn: Optional[torch.Tensor] = None  # [kept]
    moe_experts: Optional[torch.Tensor] = None  # [kept] source expert ids, in their new order
    moe_ffn: Optional[torch.Tensor] = None  # [source experts, kept], per source expert
    shared_ffn: Optional[torch.Tensor] = None  # [kept]


@dataclass
class ModelIndex:
    hidden: torch.Tensor
    layers: list[LayerIndex] = field(default_factory=list)

    def to_lists(self) -> dict:
        """Plain lists (for checkpoint metadata and JSON)."""
        def conv(t):
            return None if t is None else t.tolist()
        return {
            "hidden": conv(self.hidden),
            "layers": [{k: conv(getattr(li, k)) for k in LayerIndex.__dataclass_fields__} for li in self.layers],
        }

    @staticmethod
    def from_lists(d: dict) -> "ModelIndex":
        def conv(x):
            return None if x is None else torch.tensor(x, dtype=torch.long)
        return ModelIndex(conv(d["hidden"]), [LayerIndex(**{k: conv(v) for k, v in li.items()}) for li in d["layers"]])


def prefix_index(cfg: ModelConfig, w: Widths) -> ModelIndex:
    """The index that keeps the first `w` positions of every axis of `cfg` (slicing a
    sorted model); with `full_widths(cfg)` it is the identity."""
    layers = []
    for symbol in cfg.hybrid_pattern:
        li = LayerIndex()
        if symbol == ATTENTION:
            g = cfg.num_query_groups
            li.attn_heads = torch.arange(w.attn_heads // g).expand(g, -1).clone()
        elif symbol == MAMBA:
            g = cfg.mamba_num_groups
            li.mamba_heads = torch.arange(w.mamba_heads // g).expand(g, -1).clone()
            li.mamba_head_dim = torch.arange(w.mamba_head_dim)
        elif symbol == MLP:
            li.ffn = torch.arange(w.ffn)
        elif symbol == MOE:
            li.moe_experts = torch.arange(w.moe_experts)
            li.moe_ffn = torch.arange(w.moe_ffn).expand(cfg.moe_num_experts, -1).clone()
            if cfg.moe_shared_expert_ffn_hidden_size:
                li.shared_ffn = torch.arange(w.shared_ffn)
        layers.append(li)
    return ModelIndex(torch.arange(w.hidden), layers)


def _flat_heads(within_group: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """[groups, kept] positions within each group -> flat source head ids, group-major."""
    groups = within_group.shape[0]
    return (torch.arange(groups)[:, None] * heads_per_group + within_group).reshape(-1)


def _head_channels(flat_heads: torch.Tensor, head_dim: int, channels: torch.Tensor) -> torch.Tensor:
    return (flat_heads[:, None] * head_dim + channels[None, :]).reshape(-1)


def mamba_channel_index(cfg: ModelConfig, li: LayerIndex) -> torch.Tensor:
    """Source positions of the kept x/z/norm channels (head x channel) of a Mamba layer."""
    heads = _flat_heads(li.mamba_heads, cfg.mamba_num_heads // cfg.mamba_num_groups)
    return _head_channels(heads, cfg.mamba_head_dim, li.mamba_head_dim)


def _mamba_rows(cfg: ModelConfig, li: LayerIndex, what: str) -> torch.Tensor:
    heads = _flat_heads(li.mamba_heads, cfg.mamba_num_heads // cfg.mamba_num_groups)
    chans = mamba_channel_index(cfg, li)
    di, gd = cfg.mamba_d_inner, cfg.mamba_num_groups * cfg.mamba_state_dim
    if what == "in_proj":
        return torch.cat([chans, di + chans, 2 * di + torch.arange(2 * gd), 2 * di + 2 * gd + heads])
    if what == "conv":
        return torch.cat([chans, di + torch.arange(2 * gd)])
    if what == "heads":
        return heads
    return chans


def _qkv_rows(cfg: ModelConfig, li: LayerIndex) -> torch.Tensor:
    groups, hd = cfg.num_query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // groups
    chans = torch.arange(hd)
    rows = []
    for g in range(groups):
        base = g * (hpg + 2)
        slots = torch.cat([base + li.attn_heads[g], torch.tensor([base + hpg, base + hpg + 1])])
        rows.append(_head_channels(slots, hd, chans))
    return torch.cat(rows)


def _proj_cols(cfg: ModelConfig, li: LayerIndex) -> torch.Tensor:
    heads = _flat_heads(li.attn_heads, cfg.num_attention_heads // cfg.num_query_groups)
    return _head_channels(heads, cfg.head_dim, torch.arange(cfg.head_dim))


def copy_take(t: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t.contiguous()


def view_or_take(t: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    """`copy_take` without copying where it can: kept positions that form one contiguous run
    (a prefix of a sorted axis) become a narrowed view of `t`; only scattered positions
    (per-group head prefixes that leave gaps) are gathered into a new tensor."""
    for dim, idx in ((0, rows), (1, cols)):
        if idx is None:
            continue
        n = idx.numel()
        if n and (n == 1 or bool((idx[1:] - idx[:-1] == 1).all())):
            t = t.narrow(dim, int(idx[0]), n)
        else:
            t = t.index_select(dim, idx.to(t.device))
    return t


_NORMS = ("norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")


def _layer_tensor(cfg: ModelConfig, symbol: str, rest: str, t: torch.Tensor, h: torch.Tensor, li: LayerIndex,
                  expert: Optional[int], take=None):
    take = take or copy_take
    if rest in _NORMS:
        return take(t, h)
    if symbol == MAMBA:
        if rest == "mixer.in_proj.weight":
            return take(t, _mamba_rows(cfg, li, "in_proj"), h)
        if rest in ("mixer.conv1d.weight", "mixer.conv1d.bias"):
            return take(t, _mamba_rows(cfg, li, "conv"))
        if rest in ("mixer.dt_bias", "mixer.A_log", "mixer.D"):
            return take(t, _mamba_rows(cfg, li, "heads"))
        if rest == "mixer.norm.weight":
            return take(t, _mamba_rows(cfg, li, "chans"))
        if rest == "mixer.out_proj.weight":
            return take(t, h, _mamba_rows(cfg, li, "chans"))
    elif symbol == ATTENTION:
        if rest == "self_attention.linear_qkv.weight":
            return take(t, _qkv_rows(cfg, li), h)
        if rest == "self_attention.linear_proj.weight":
            return take(t, h, _proj_cols(cfg, li))
    elif symbol == MLP:
        if rest == "mlp.linear_fc1.weight":
            return take(t, li.ffn, h)
        if rest == "mlp.linear_fc2.weight":
            return take(t, h, li.ffn)
    elif symbol == MOE:
        if rest == "mlp.router.weight":
            return take(t, li.moe_experts, h)
        if rest == "mlp.router.expert_bias":
            return take(t, li.moe_experts)
        if expert is not None:
            if rest == "linear_fc1.weight":
                return take(t, li.moe_ffn[expert], h)
            if rest == "linear_fc2.weight":
                return take(t, h, li.moe_ffn[expert])
        if rest == "mlp.shared_experts.linear_fc1.weight":
            return take(t, li.shared_ffn, h)
        if rest == "mlp.shared_experts.linear_fc2.weight":
            return take(t, h, li.shared_ffn)
    _no_rule(symbol, rest)


def expert_slots(index: ModelIndex) -> dict[int, dict[int, int]]:
    return {i: {int(src): new for new, src in enumerate(li.moe_experts.tolist())}
            for i, li in enumerate(index.layers) if li.moe_experts is not None}


_RULES = {
    MAMBA: ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.dt_bias", "mixer.A_log",
            "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight"),
    ATTENTION: ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"),
    MLP: ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight"),
    MOE: ("mlp.router.weight", "mlp.router.expert_bias", "mlp.shared_experts.linear_fc1.weight",
          "mlp.shared_experts.linear_fc2.weight"),
}


def _has_rule(symbol: str, rest: str, expert: Optional[int]) -> bool:
    if rest in _NORMS:
        return True
    if expert is not None:
        return symbol == MOE and rest in ("linear_fc1.weight", "linear_fc2.weight")
    return rest in _RULES[symbol]


def _no_rule(symbol: str, rest: str):
    raise KeyError(f"reindex: no rule for tensor {rest!r} of a {symbol!r} layer (unknown parameter; update elastic/reindex.py)")


def reindex_rule(cfg: ModelConfig, index: ModelIndex, name: str, slots: Optional[dict] = None, take=copy_take):
    """(new name, fn) for source tensor `name`: fn(tensor) gives the re-indexed tensor
    (it also runs on meta tensors, giving the new shape). None: an expert the index drops.
    `take(t, rows, cols)` cuts a tensor: a contiguous copy (default) or `view_or_take`."""
    slots = expert_slots(index) if slots is None else slots
    h = index.hidden
    m = _LAYER.match(name)
    if m is None:
        if name.endswith("._extra_state"):
            return name, lambda t: t
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return name, lambda t: take(t, None, h)
        if name == "decoder.final_norm.weight":
            return name, lambda t: take(t, h)
        raise KeyError(f"reindex: no rule for tensor {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    symbol = cfg.hybrid_pattern[layer]
    expert = None
    e = _EXPERT.match(rest)
    if e is not None:
        expert, rest = int(e.group(1)), e.group(2)
        if expert not in slots[layer]:
            return None
        name = f"decoder.layers.{layer}.mlp.experts.local_experts.{slots[layer][expert]}.{rest}"
    if rest.endswith("_extra_state"):
        return name, lambda t: t
    li = index.layers[layer]
    if not _has_rule(symbol, rest, expert):  # fail on unknown names before any tensor is read
        _no_rule(symbol, rest)
    return name, lambda t: _layer_tensor(cfg, symbol, rest, t, h, li, expert, take)


def reindex_items(cfg: ModelConfig, index: ModelIndex, items: Iterable[tuple[str, object]]):
    """Yield (new name, new tensor) for each (name, tensor) of a source state dict of
    `cfg`, one tensor at a time (streaming: a whole model never has to be in memory).
    Experts that the index drops are skipped; kept experts are renumbered."""
    slots = expert_slots(index)
    for name, t in items:
        rule = reindex_rule(cfg, index, name, slots)
        if rule is not None:
            yield rule[0], rule[1](t)


def reindex_source(cfg: ModelConfig, index: ModelIndex, source):
    """A lazy view of a TensorSource (flat naming) re-indexed by `index`: tensors are
    cut only when asked for (slicing a checkpoint one tensor at a time)."""
    from elastic_megatron.convert.tensors import MappedSource

    slots = expert_slots(index)
    rules = {}
    for name in source.names():
        rule = reindex_rule(cfg, index, name, slots)
        if rule is not None:
            rules[rule[0]] = ((name,), rule[1])
    return MappedSource(source, rules)


def reindex_state_dict(cfg: ModelConfig, index: ModelIndex, state_dict: dict) -> dict:
    return dict(reindex_items(cfg, index, state_dict.items()))
