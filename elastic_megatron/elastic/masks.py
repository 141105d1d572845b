"""Width masks on unmodified Megatron-Core modules, through forward hooks.

`ElasticMasks` holds one mask per axis in the axis's flat layout (1 = channel kept).
Hard masks of a Widths are 0/1 prefixes of the sorted axes; during training the router
gives mixtures `sum_i y_i * prefix(candidate_i)` whose forward value is a hard prefix
(straight-through) or a soft blend, and whose gradients flow back to the router.

One manager per module type attaches the hooks (as Flextron does in Megatron-LM):

- `NormMasker` (every RMSNorm on the residual stream, final norm included): normalises
  over the active hidden channels only, `x / sqrt(sum(m x^2) / sum(m) + eps) * w * m`,
  which is what the sliced model's smaller RMSNorm computes. Layer outputs may leave
  values in inactive residual channels; every reader of the residual stream is one of
  these norms, so they never reach an active channel.
- `AttentionHeadMasker`: zeroes inactive heads at the core-attention output (before
  linear_proj); head masks are per-group prefixes, so GQA's head-to-group map is kept.
- `MambaMasker`: Mamba2's gated group norm over active channels (heads x head channels)
  of each group only, and zero elsewhere (before out_proj).
- `FFNMasker`: the input of linear_fc2 of dense MLPs, every routed expert and the shared
  expert.
- `ExpertMasker`: inactive experts get -inf router logits and -inf expert bias before
  top-k, so they are never selected; routing probabilities are multiplied by the expert
  mask so its gradient reaches the router.

With no masks set (`masks=None`) every hook is a pass-through: the model is the parent.
A mask may also be 2-D, one row per layer that carries the axis (heterogeneous widths);
each hook knows its layer's position among those layers (counted over the whole
pattern, so a pipeline stage takes the rows of its own layers) and takes its row.

Parallel layouts (`ShardedMasks`): masks are always built in the flat, layout-free
index space, so a budget selects the same channels at every TP/EP/PP size. Each rank
then takes the part its modules hold, through Megatron's TP mappings so that the
router's gradient is the whole model's on every rank:
- head axes and dense/shared FFN channels are split like the weights (contiguous TP
  shards; head prefixes are per group and TP splits whole groups, so every TP rank keeps
  the same number of active heads); backward all-gathers the shard gradients;
- expert FFN channels are split over the expert-TP group when ETP > 1;
- axes every rank uses whole but on part of the work (Mamba head channels under TP;
  hidden, expert choice and ETP=1 expert channels on sequence-parallel tokens) keep the
  full mask; backward sums the partial gradients over TP.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.sites import hidden_norms, layer_sites
from elastic_megatron.elastic.widths import Widths, axis_group_count, full_widths
from elastic_megatron.models.mamba_mixer import HybridMambaMixer
from elastic_megatron.models.recompute import register_state
from elastic_megatron.models.norms import RMSNorm


@dataclass
class ElasticMasks:
    """Per-axis masks in flat source layout; None = axis at full width."""

    hidden: Optional[torch.Tensor] = None  # [hidden]
    attn_heads: Optional[torch.Tensor] = None  # [heads], group-major
    mamba_heads: Optional[torch.Tensor] = None  # [heads], group-major
    mamba_head_dim: Optional[torch.Tensor] = None  # [head_dim]
    ffn: Optional[torch.Tensor] = None
    moe_ffn: Optional[torch.Tensor] = None
    moe_experts: Optional[torch.Tensor] = None
    shared_ffn: Optional[torch.Tensor] = None


def axis_length(cfg: ModelConfig, axis: str) -> int:
    return getattr(full_widths(cfg), axis)


def prefix_matrix(cfg: ModelConfig, axis: str, candidates: Sequence[int]) -> torch.Tensor:
    """[candidates, axis length] 0/1: row i keeps the first candidates[i] positions of the
    axis (per group for head axes)."""
    length = axis_length(cfg, axis)
    groups = axis_group_count(cfg, axis)
    per_group = length // groups
    position = torch.arange(length) % per_group  # position within the group
    keep = torch.tensor([c // groups for c in candidates])[:, None]
    return (position[None, :] < keep).float()


def hard_masks(cfg: ModelConfig, w: Widths) -> ElasticMasks:
    """0/1 masks of the nested model with widths `w` (None where the axis is full)."""
    full = full_widths(cfg)
    out = ElasticMasks()
    for f in fields(ElasticMasks):
        value = getattr(w, f.name)
        if isinstance(value, tuple):  # per layer: one row per layer carrying the axis
            setattr(out, f.name, prefix_matrix(cfg, f.name, list(value)))
        elif value != getattr(full, f.name):
            setattr(out, f.name, prefix_matrix(cfg, f.name, [value])[0])
    return out


def _row(mask: Optional[torch.Tensor], k: int) -> Optional[torch.Tensor]:
    """The mask of the k-th layer carrying the axis (2-D masks are per layer)."""
    if mask is None or mask.dim() == 1:
        return mask
    return mask[k]


def mixture_masks(cfg: ModelConfig, candidates: dict[str, Sequence[int]], weights: dict[str, torch.Tensor]) -> ElasticMasks:
    """Masks sum_i weights[axis][..., i] * prefix(candidates[axis][i]), differentiable in the
    weights; weights of shape [layers, candidates] give per-layer masks."""
    out = ElasticMasks()
    for axis, cand in candidates.items():
        y = weights[axis]
        setattr(out, axis, y @ prefix_matrix(cfg, axis, cand).to(y.device, y.dtype))
    return out


def _masked_rms(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """RMSNorm over the channels weighted by `mask` (per group), in fp32."""
    m = mask.float()
    x32 = x.float() * m
    xg = x32.unflatten(-1, (groups, -1))
    mg = m.unflatten(-1, (groups, -1))
    var = xg.pow(2).sum(-1, keepdim=True) / mg.sum(-1, keepdim=True).clamp(min=1e-6)
    return (xg * torch.rsqrt(var + eps)).flatten(-2) * weight.float() * m


class _Masker:
    """Base: holds the hook handles and reads the shared state's current masks."""

    def __init__(self, state: "ElasticState"):
        self.state = state
        self.handles = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class NormMasker(_Masker):
    def attach(self, module: RMSNorm) -> None:
        def hook(mod, args, out):
            m = self.state.masks.hidden if self.state.masks else None
            if m is None:
                return out
            return _masked_rms(args[0], m.to(args[0].device), mod.weight, mod.eps).to(out.dtype)

        self.handles.append(module.register_forward_hook(hook))


class AttentionHeadMasker(_Masker):
    def attach(self, core_attention, head_dim: int, k: int) -> None:
        def hook(mod, args, out):
            m = _row(self.state.masks.attn_heads, k) if self.state.masks else None
            if m is None:
                return out
            return out * m.to(out.device, out.dtype).repeat_interleave(head_dim)

        self.handles.append(core_attention.register_forward_hook(hook))


class MambaMasker(_Masker):
    def attach(self, mixer: HybridMambaMixer, k: int) -> None:
        norm = mixer.norm

        def hook(mod, args, out):
            masks = self.state.masks
            if masks is None or (masks.mamba_heads is None and masks.mamba_head_dim is None):
                return out
            y, z = args
            heads = _row(masks.mamba_heads, k) if masks.mamba_heads is not None else torch.ones(mixer.nheads_local_tp)
            chans = _row(masks.mamba_head_dim, k) if masks.mamba_head_dim is not None else torch.ones(mixer.headdim)
            m = (heads.to(y.device)[:, None] * chans.to(y.device)[None, :]).flatten()
            gated = y.float() * F.silu(z.float())
            return _masked_rms(gated, m, mod.weight, mod.eps, groups=mixer.ngroups_local_tp).to(out.dtype)

        self.handles.append(norm.register_forward_hook(hook))


class FFNMasker(_Masker):
    def attach(self, linear_fc2, axis: str, k: int) -> None:
        def pre_hook(mod, args):
            m = _row(getattr(self.state.masks, axis), k) if self.state.masks else None
            if m is None:
                return None
            x = args[0]
            return (x * m.to(x.device, x.dtype),) + tuple(args[1:])

        self.handles.append(linear_fc2.register_forward_pre_hook(pre_hook))


class ExpertMasker(_Masker):
    """Wraps TopKRouter.routing of one router instance (the class is untouched)."""

    def __init__(self, state):
        super().__init__(state)
        self.routers = []

    def attach(self, router, k: int) -> None:
        original = router.routing

        def routing(mod, logits, *args, **kwargs):
            m = _row(self.state.masks.moe_experts, k) if self.state.masks else None
            if m is None:
                return original(logits, *args, **kwargs)
            m = m.to(logits.device)
            inactive = m <= 0
            logits = logits.masked_fill(inactive, float("-inf"))
            saved = mod._buffers.get("expert_bias")
            if saved is not None:
                mod._buffers["expert_bias"] = saved.masked_fill(inactive, float("-inf"))
            try:
                probs, routing_map = original(logits, *args, **kwargs)
            finally:
                if saved is not None:
                    mod._buffers["expert_bias"] = saved
            return probs * m.to(probs.dtype), routing_map

        router.routing = types.MethodType(routing, router)
        self.routers.append((router, original))

    def remove(self) -> None:
        for router, _ in self.routers:
            del router.routing  # back to the class method
        self.routers.clear()


class ShardedMasks:
    """Turns flat masks into the parts this rank's modules use (see the module doc)."""

    SHARDED_TP = ("attn_heads", "mamba_heads", "ffn", "shared_ffn")

    def __init__(self, sequence_parallel: bool):
        self.tp = parallel_state.get_tensor_model_parallel_group()
        self.etp = parallel_state.get_expert_tensor_parallel_group()
        self.tp_size = torch.distributed.get_world_size(self.tp)
        self.etp_size = torch.distributed.get_world_size(self.etp)
        self.sp = sequence_parallel

    def local(self, masks: Optional[ElasticMasks]) -> Optional[ElasticMasks]:
        if masks is None or (self.tp_size == 1 and self.etp_size == 1):
            return masks
        out = ElasticMasks()
        for f in fields(ElasticMasks):
            m = getattr(masks, f.name)
            if m is not None:
                setattr(out, f.name, self._part(f.name, m))
        return out

    def _part(self, axis: str, m: torch.Tensor) -> torch.Tensor:
        if axis in self.SHARDED_TP and self.tp_size > 1:
            return scatter_to_tensor_model_parallel_region(m, group=self.tp)
        if axis == "moe_ffn" and self.etp_size > 1:
            return scatter_to_tensor_model_parallel_region(m, group=self.etp)
        partial_over_tp = axis == "mamba_head_dim" or (self.sp and axis in ("hidden", "moe_experts", "moe_ffn"))
        if partial_over_tp and self.tp_size > 1 and m.requires_grad:
            return copy_to_tensor_model_parallel_region(m, group=self.tp)
        return m


class ElasticState:
    """The masks every hook of one model reads; set before each forward."""

    def __init__(self):
        self.masks: Optional[ElasticMasks] = None


class ElasticHooks:
    """All maskers of one model. `set(masks)` selects a nested model, `set(None)` the parent."""

    def __init__(self, model, cfg: ModelConfig):
        self.state = ElasticState()
        # A recomputed layer (trainer.recompute) must see the masks of its forward.
        register_state(model, self.state, "masks")
        self.sharding = ShardedMasks(bool(getattr(model.config, "sequence_parallel", False)))
        self.norms = NormMasker(self.state)
        self.attention = AttentionHeadMasker(self.state)
        self.mamba = MambaMasker(self.state)
        self.ffn = FFNMasker(self.state)
        self.experts = ExpertMasker(self.state)
        for norm in hidden_norms(model):
            self.norms.attach(norm)
        for site in layer_sites(model, cfg):
            if site.mamba is not None:
                self.mamba.attach(site.mamba, site.index)
            elif site.moe is not None:
                self.experts.attach(site.moe.router, site.index)
                for expert in site.moe.experts:
                    self.ffn.attach(expert.linear_fc2, "moe_ffn", site.index)
                if site.moe.shared_fc2 is not None:
                    self.ffn.attach(site.moe.shared_fc2, "shared_ffn", site.index)
            elif site.mlp_fc2 is not None:
                self.ffn.attach(site.mlp_fc2, "ffn", site.index)
            elif site.core_attention is not None:
                self.attention.attach(site.core_attention, cfg.head_dim, site.index)

    def set(self, masks: Optional[ElasticMasks]) -> None:
        self.state.masks = self.sharding.local(masks)

    def remove(self) -> None:
        for m in (self.norms, self.attention, self.mamba, self.ffn, self.experts):
            m.remove()
