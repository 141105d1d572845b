"""Budgets: the nested models of an elastic spec, resolved against the parent, and the
record of them that every elastic checkpoint carries.

- `resolve_budgets` turns `elastic.budgets` (recipes/elastic/*.yaml) into
  `ResolvedBudget`s, checking every width against the model's axes and the parallel
  layout; `validate_elastic` adds the spec's other settings (config/elastic.py).
- `budgets_meta` is what an elastic checkpoint records: for each budget its target and
  resolved architecture (the router's choice, or the pinned widths). `recorded_budgets`
  / `recorded_budget` / `checkpoint_budgets` read it back (slicing, evaluation, storage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from elastic_megatron.checkpoint.metadata import read_common_state
from elastic_megatron.config.elastic import ElasticConfig, validate_elastic_settings
from elastic_megatron.config.errors import ConfigError, require_choice
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.widths import AXES, TARGET_KINDS, Widths, axes_in_use, axis_layers, check_width, full_widths, model_cost


@dataclass
class ResolvedBudget:
    """A validated budget: fixed widths for every axis it does not route, candidates for
    the axes it does, and its target."""

    name: str
    target_kind: str
    target: float
    fixed: Widths  # the widths of the pinned / unrouted axes (routed axes hold the parent's)
    candidates: dict[str, list[int]]

    @property
    def routed(self) -> bool:
        return bool(self.candidates)


def _key(i: int, rest: str) -> str:
    return f"elastic.budgets[{i}].{rest}"


def resolve_budgets(spec: ElasticConfig, cfg: ModelConfig, parallel=None) -> list[ResolvedBudget]:
    """Validate the budgets against the parent `cfg`; raise ConfigError naming the culprit."""
    if not spec.budgets:
        raise ConfigError("elastic.budgets", [], "needs at least one budget (see recipes/elastic/tiny.yaml)")
    used = axes_in_use(cfg)
    full = full_widths(cfg)
    names = [b.name for b in spec.budgets]
    if len(set(names)) != len(names):
        raise ConfigError("elastic.budgets", names, "budget names must be unique")
    out = []
    for i, b in enumerate(spec.budgets):
        require_choice(_key(i, "target_kind"), b.target_kind, TARGET_KINDS)
        for mapping, what in ((b.widths, "widths"), (b.candidates, "candidates")):
            for axis in mapping:
                if axis not in AXES:
                    raise ConfigError(_key(i, f"{what}.{axis}"), mapping[axis], f"unknown axis; allowed: {list(AXES)}")
                if axis not in used:
                    raise ConfigError(_key(i, f"{what}.{axis}"), mapping[axis],
                                      f"the model has no {axis} axis (pattern {cfg.hybrid_pattern}); axes in use: {list(used)}")
        both = sorted(set(b.widths) & set(b.candidates))
        if both:
            raise ConfigError(_key(i, f"candidates.{both[0]}"), b.candidates[both[0]], "an axis is either pinned (widths) or routed (candidates), not both")
        for axis, value in b.widths.items():
            if isinstance(value, (list, tuple)) and axis != "hidden":
                layers = axis_layers(cfg, axis)
                if len(value) != layers:
                    raise ConfigError(_key(i, f"widths.{axis}"), list(value), f"a per-layer list needs one width per layer with the axis ({layers})")
                for v in value:
                    check_width(cfg, axis, v, _key(i, f"widths.{axis}"), parallel)
            else:
                check_width(cfg, axis, value, _key(i, f"widths.{axis}"), parallel)
        candidates = {}
        for axis, values in b.candidates.items():
            values = list(values)
            if not values:
                raise ConfigError(_key(i, f"candidates.{axis}"), values, "needs at least one width")
            for v in values:
                check_width(cfg, axis, v, _key(i, f"candidates.{axis}"), parallel)
            if len(set(values)) != len(values):
                raise ConfigError(_key(i, f"candidates.{axis}"), values, "candidate widths must be distinct")
            candidates[axis] = sorted(values)
        fixed = full.replace(**dict(b.widths))
        if b.target is None:
            if candidates:
                raise ConfigError(_key(i, "target"), None, "a budget with router candidates needs a target")
            target = float(model_cost(cfg, fixed, b.target_kind))
        else:
            target = float(b.target)
            if not (math.isfinite(target) and target > 0):
                raise ConfigError(_key(i, "target"), b.target, "must be a positive number")
        # Reachability: the cheapest and the most expensive choice must bracket the target.
        lo = fixed.replace(**{a: v[0] for a, v in candidates.items()})
        hi = fixed.replace(**{a: v[-1] for a, v in candidates.items()})
        cost_lo, cost_hi = model_cost(cfg, lo, b.target_kind), model_cost(cfg, hi, b.target_kind)
        tolerance = 0.02
        if candidates and not cost_lo * (1 - tolerance) <= target <= cost_hi * (1 + tolerance):
            raise ConfigError(_key(i, "target"), b.target,
                              f"no candidate reaches it: the candidates give {b.target_kind} between {cost_lo:,} and {cost_hi:,}")
        if not candidates and b.target is not None and abs(cost_lo - target) > tolerance * target:
            raise ConfigError(_key(i, "target"), b.target,
                              f"the pinned widths give {b.target_kind}={cost_lo:,}, more than 2% away; set target to null or fix the widths")
        out.append(ResolvedBudget(b.name, b.target_kind, target, fixed, candidates))
    for i in range(1, len(out)):
        if out[i].target_kind != out[0].target_kind:
            raise ConfigError(_key(i, "target_kind"), out[i].target_kind, f"all budgets must use one target kind ({out[0].target_kind})")
        if not out[i].target < out[i - 1].target:
            raise ConfigError(_key(i, "target"), out[i].target,
                              f"budgets must be listed largest first: {out[i].name} is not below {out[i - 1].name} ({out[i - 1].target:,.0f})")
    return out


def validate_elastic(spec: ElasticConfig, cfg: ModelConfig, parallel=None) -> list[ResolvedBudget]:
    """All elastic checks (`parallel`: the layout the budgets must fit); returns the
    resolved budgets."""
    budgets = resolve_budgets(spec, cfg, parallel)
    validate_elastic_settings(spec, cfg)
    return budgets


def spec_budgets(cfg: ModelConfig, spec: ElasticConfig) -> tuple[list[tuple[str, Widths]], list[str]]:
    """Budgets of an elastic recipe with fixed widths, and the names of router-chosen ones
    (their widths exist only after training: read them from a checkpoint)."""
    fixed, routed = [], []
    for b in resolve_budgets(spec, cfg):
        (routed.append(b.name) if b.routed else fixed.append((b.name, b.fixed)))
    return fixed, routed


# ---- the budget record of an elastic checkpoint ---------------------------------------

def budgets_meta(spec: ElasticConfig, cfg: ModelConfig, budgets: list[ResolvedBudget], archs: dict[str, Widths]) -> dict:
    """The `elastic` entry of an elastic checkpoint's metadata: each budget's target and
    resolved architecture `archs[name]`, with its parameter counts."""
    return {
        "spec": spec.name,
        "teacher_checkpoint": str(spec.teacher_checkpoint),
        "budgets": [
            {"name": b.name, "target_kind": b.target_kind, "target": b.target,
             "widths": archs[b.name].as_dict(),
             "total_params": int(model_cost(cfg, archs[b.name], "total_params")),
             "active_params": int(model_cost(cfg, archs[b.name], "active_params"))}
            for b in budgets
        ],
    }


def recorded_budgets(meta: dict, where) -> list[tuple[str, Widths]]:
    """(name, resolved widths) of every budget an elastic checkpoint's meta records;
    ConfigError if it is not elastic."""
    elastic = meta.get("elastic") or {}
    if not meta.get("sort_index") or not elastic.get("budgets"):
        raise ConfigError("elastic checkpoint", str(where),
                          "is not elastic: its metadata has no sort_index and resolved budget architectures "
                          "(use the output of an elastic stage1/stage2 run)")
    return [(b["name"], Widths(**b["widths"])) for b in elastic["budgets"]]


def checkpoint_budgets(path: str | Path) -> list[tuple[str, Widths]]:
    """(name, widths) of every budget recorded in the elastic checkpoint at `path`."""
    return recorded_budgets(read_common_state(path).get("meta") or {}, path)


def recorded_budget(meta: dict, name: str, where, key: str = "--size", uniform: bool = True) -> Widths:
    """The widths of budget `name`; ConfigError listing the recorded names otherwise.
    `uniform`: refuse per-layer widths (they have no standalone config)."""
    budgets = dict(recorded_budgets(meta, where))
    if name not in budgets:
        raise ConfigError(key, name, f"is not a budget of this checkpoint; allowed: {list(budgets)}")
    if uniform and budgets[name].heterogeneous:
        raise ConfigError(key, name, "has per-layer widths, which have no uniform standalone config; slice a uniform budget")
    return budgets[name]
