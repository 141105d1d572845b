"""Importance of every width axis from activation statistics, and the sorting index.

Forward hooks collect, over calibration batches (no gradients):

| axis            | statistic                                                        |
|-----------------|------------------------------------------------------------------|
| hidden          | mean |x| per channel of every RMSNorm output (all layers + final) |
| attn_heads      | mean L2 norm per head of the core-attention output               |
| mamba_heads     | mean L2 norm per head of the gated-norm output (out_proj input)  |
| mamba_head_dim  | mean |y| per head channel of that output, summed over heads       |
| ffn, moe_ffn, shared_ffn | mean |a| per channel of the linear_fc2 input (per expert) |
| moe_experts     | REAP: mean over the tokens routed to expert e of g_e(x) * ||E_e(x)||_2 |

Megatron-Core's experts multiply the gate weight in before fc2 (per-token scale), so an
expert module's output already is g_e(x) * E_e(x); its row norms give REAP directly.

`sorting_index` turns scores into a `ModelIndex` of permutations (heads within their
group, stable descending order) for `elastic.reindex`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.reindex import LayerIndex, ModelIndex
from elastic_megatron.elastic.sites import hidden_norms, layer_sites


@dataclass
class LayerScores:
    attn_heads: Optional[torch.Tensor] = None
    mamba_heads: Optional[torch.Tensor] = None
    mamba_head_dim: Optional[torch.Tensor] = None
    ffn: Optional[torch.Tensor] = None
    moe_ffn: Optional[torch.Tensor] = None  # [experts, moe_ffn]
    moe_experts: Optional[torch.Tensor] = None  # REAP
    shared_ffn: Optional[torch.Tensor] = None


@dataclass
class ImportanceScores:
    hidden: torch.Tensor
    layers: list[LayerScores] = field(default_factory=list)

    def as_dict(self) -> dict:
        def conv(t):
            return None if t is None else t.tolist()
        return {"hidden": conv(self.hidden),
                "layers": [{k: conv(getattr(s, k)) for k in LayerScores.__dataclass_fields__} for s in self.layers]}


class _Sum:
    """Running sum and count of a per-channel statistic."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, value: torch.Tensor, count: int) -> None:
        value = value.detach().double().cpu()
        self.total = value if self.total is None else self.total + value
        self.count += count

    def mean(self) -> Optional[torch.Tensor]:
        if self.total is None:
            return None
        return self.total / max(self.count, 1)


class ImportanceCollector:
    """Attach to a model, run forward passes, read `scores()`; `remove()` the hooks."""

    def __init__(self, model, cfg: ModelConfig):
        self.cfg = cfg
        self.handles = []
        self.hidden = _Sum()
        self.layer_stats: list[dict] = []
        for norm in hidden_norms(model):
            self._hook(norm, self._on_norm, pre=False)
        for site in layer_sites(model, cfg):
            stats: dict = {}
            self.layer_stats.append(stats)
            if site.mamba is not None:
                stats["mamba_heads"], stats["mamba_head_dim"] = _Sum(), _Sum()
                self._hook(site.mamba.out_proj, self._mamba(stats, site.mamba), pre=True)
            elif site.moe is not None:
                n = len(site.moe.experts)
                stats["moe_ffn"] = [_Sum() for _ in range(n)]
                stats["reap"] = [_Sum() for _ in range(n)]
                for e, expert in enumerate(site.moe.experts):
                    self._hook(expert.linear_fc2, self._channels(stats["moe_ffn"][e]), pre=True)
                    self._hook(expert, self._reap(stats["reap"][e]), pre=False)
                if site.moe.shared_fc2 is not None:
                    stats["shared_ffn"] = _Sum()
                    self._hook(site.moe.shared_fc2, self._channels(stats["shared_ffn"]), pre=True)
            elif site.mlp_fc2 is not None:
                stats["ffn"] = _Sum()
                self._hook(site.mlp_fc2, self._channels(stats["ffn"]), pre=True)
            elif site.core_attention is not None:
                stats["attn_heads"] = _Sum()
                self._hook(site.core_attention, self._attention(stats["attn_heads"]), pre=False)

    def _hook(self, module, fn, pre: bool) -> None:
        if pre:
            self.handles.append(module.register_forward_pre_hook(lambda mod, args: fn(args[0])))
        else:
            self.handles.append(module.register_forward_hook(lambda mod, args, out: fn(out)))

    def _on_norm(self, out) -> None:
        flat = out.reshape(-1, out.shape[-1]).float()
        self.hidden.add(flat.abs().sum(0), flat.shape[0])

    @staticmethod
    def _channels(acc: _Sum):
        def fn(x):
            flat = x.reshape(-1, x.shape[-1]).float()
            acc.add(flat.abs().sum(0), flat.shape[0])
        return fn

    def _attention(self, acc: _Sum):
        hd = self.cfg.head_dim

        def fn(out):
            heads = out.reshape(-1, out.shape[-1] // hd, hd).float()
            acc.add(heads.norm(dim=-1).sum(0), heads.shape[0])
        return fn

    @staticmethod
    def _mamba(stats: dict, mixer):
        def fn(y):
            heads = y.reshape(-1, mixer.nheads_local_tp, mixer.headdim).float()
            stats["mamba_heads"].add(heads.norm(dim=-1).sum(0), heads.shape[0])
            stats["mamba_head_dim"].add(heads.abs().sum((0, 1)), heads.shape[0])
        return fn

    @staticmethod
    def _reap(acc: _Sum):
        def fn(out):
            rows = out[0] if isinstance(out, tuple) else out
            rows = rows.reshape(-1, rows.shape[-1]).float()
            acc.add(rows.norm(dim=-1).sum().reshape(1), rows.shape[0])
        return fn

    def scores(self) -> ImportanceScores:
        layers = []
        for stats in self.layer_stats:
            s = LayerScores()
            for key in ("attn_heads", "mamba_heads", "mamba_head_dim", "ffn", "shared_ffn"):
                if key in stats:
                    setattr(s, key, stats[key].mean())
            if "moe_ffn" in stats:
                width = self.cfg.moe_ffn_hidden_size
                s.moe_ffn = torch.stack([a.mean() if a.total is not None else torch.zeros(width, dtype=torch.float64)
                                         for a in stats["moe_ffn"]])
                # An expert no calibration token reached scores 0 (REAP of an empty set).
                s.moe_experts = torch.cat([a.mean() if a.total is not None else torch.zeros(1, dtype=torch.float64)
                                           for a in stats["reap"]])
            layers.append(s)
        hidden = self.hidden.mean()
        if hidden is None:
            raise RuntimeError("importance: no forward pass reached the norms; run calibration batches first")
        return ImportanceScores(hidden, layers)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices


def _within_groups(scores: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.stack([_descending(g) for g in scores.reshape(groups, -1)])


def sorting_index(cfg: ModelConfig, scores: ImportanceScores) -> ModelIndex:
    """Permutations that put every axis in descending importance."""
    layers = []
    for s in scores.layers:
        li = LayerIndex()
        if s.attn_heads is not None:
            li.attn_heads = _within_groups(s.attn_heads, cfg.num_query_groups)
        if s.mamba_heads is not None:
            li.mamba_heads = _within_groups(s.mamba_heads, cfg.mamba_num_groups)
            li.mamba_head_dim = _descending(s.mamba_head_dim)
        if s.ffn is not None:
            li.ffn = _descending(s.ffn)
        if s.moe_experts is not None:
            li.moe_experts = _descending(s.moe_experts)
            li.moe_ffn = torch.stack([_descending(row) for row in s.moe_ffn])
        if s.shared_ffn is not None:
            li.shared_ffn = _descending(s.shared_ffn)
        layers.append(li)
    return ModelIndex(_descending(scores.hidden), layers)


def plot_scores(scores: ImportanceScores, cfg: ModelConfig, out_dir) -> list:
    """One PNG per axis: the scores of every layer (sorted order shown as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    series = {"hidden": [("all norms", scores.hidden)]}
    for i, s in enumerate(scores.layers):
        for axis in ("attn_heads", "mamba_heads", "mamba_head_dim", "ffn", "moe_experts", "shared_ffn"):
            value = getattr(s, axis)
            if value is not None:
                series.setdefault(axis, []).append((f"layer {i} ({cfg.hybrid_pattern[i]})", value))
        if s.moe_ffn is not None:
            series.setdefault("moe_ffn", []).append((f"layer {i} (mean over experts)", s.moe_ffn.mean(0)))
    for axis, lines in series.items():
        fig, (ax_raw, ax_sorted) = plt.subplots(1, 2, figsize=(10, 3.5))
        for label, value in lines:
            ax_raw.plot(value.numpy(), label=label, lw=1)
            ax_sorted.plot(torch.sort(value, descending=True).values.numpy(), label=label, lw=1)
        ax_raw.set_title(f"{axis}: importance by original position")
        ax_sorted.set_title(f"{axis}: sorted")
        for ax in (ax_raw, ax_sorted):
            ax.set_xlabel("channel / head / expert")
            ax.set_ylabel("score")
        if len(lines) <= 12:
            ax_sorted.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"importance_{axis}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
