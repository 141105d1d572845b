"""Elastic spec schema (recipes/elastic/*.yaml) and its validation.

An elastic spec names the nested budgets. Each budget has a target (total parameters,
active parameters or bf16 weight bytes) and either pinned widths (its architecture is
fixed) or, per axis, candidate widths the router chooses from; axes a budget does not
mention stay at the parent's width. Budgets are listed largest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from elastic_megatron.config.errors import ConfigError, require_choice, require_positive_int
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.widths import AXES, TARGET_KINDS, Widths, axes_in_use, axis_layers, check_width, full_widths, model_cost

TEMPERATURE_SCHEDULES = ("exponential", "linear", "constant")


@dataclass
class BudgetConfig:
    name: str = "full"
    target_kind: str = "total_params"
    # Target value in units of target_kind; null for a pinned budget = its own cost.
    target: Optional[float] = None
    # Pinned widths, axis -> width, or a list with one width per layer carrying the axis.
    widths: dict[str, Any] = field(default_factory=dict)
    # Router candidates, axis -> widths to choose from.
    candidates: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RouterConfig:
    hidden_size: int = 64
    # Router learning rate = trainer.lr * lr_mult (constant), Adam.
    lr_mult: float = 10.0
    # Gumbel-Softmax temperature, annealed from start to end over trainer.max_steps.
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    temperature_schedule: str = "exponential"
    # true: straight-through hard samples (forward = one candidate); false: soft mixtures.
    hard: bool = True
    # lambda of the router loss ((expected cost - target) / target)^2.
    loss_weight: float = 1.0
    # One choice per layer on every axis but hidden (heterogeneous nested models; these
    # exist as masks and evaluate like any budget, but have no uniform sliced config).
    per_layer: bool = False


@dataclass
class DistillConfig:
    temperature: float = 1.0
    # 0: KL over the whole vocabulary; k > 0: over the teacher's top-k logits.
    top_k: int = 0
    # Tokens per chunk of the logits (neither model's full fp32 logits exist at once).
    chunk_tokens: int = 1024
    # Weight of an extra next-token cross entropy on the student (0 = pure KD).
    lm_loss_weight: float = 0.0


@dataclass
class CurriculumConfig:
    # Sampling probability per budget, in budget order; null = uniform.
    budget_probs: Optional[list[float]] = None
    # Budgets trained on each micro-batch, sharing one teacher forward.
    budgets_per_batch: int = 1


@dataclass
class ImportanceConfig:
    calibration_batches: int = 16
    plots: bool = True


@dataclass
class ElasticConfig:
    # false: plain training of one model (pretraining).
    enabled: bool = False
    name: str = "none"
    budgets: list[BudgetConfig] = field(default_factory=list)
    router: RouterConfig = field(default_factory=RouterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    # Importance: the parent to score and sort (a run dir or a checkpoint dir).
    parent_checkpoint: Optional[str] = None
    # Elastic training: the sorted parent (the importance run dir); it is the frozen teacher.
    teacher_checkpoint: Optional[str] = None
    # Student initialisation (weights, router); null = the teacher. Stage 2: stage 1's run dir.
    init_checkpoint: Optional[str] = None


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
    if cfg.backend != "local":
        raise ConfigError("model.backend", cfg.backend, "elastic masks hook the local backend's separate norms; allowed: local")
    r, d, c = spec.router, spec.distill, spec.curriculum
    require_positive_int("elastic.router.hidden_size", r.hidden_size)
    for key in ("lr_mult", "temperature_start", "temperature_end"):
        if not getattr(r, key) > 0:
            raise ConfigError(f"elastic.router.{key}", getattr(r, key), "must be a positive number")
    if r.loss_weight < 0:
        raise ConfigError("elastic.router.loss_weight", r.loss_weight, "must be >= 0")
    require_choice("elastic.router.temperature_schedule", r.temperature_schedule, TEMPERATURE_SCHEDULES)
    if not d.temperature > 0:
        raise ConfigError("elastic.distill.temperature", d.temperature, "must be a positive number")
    require_positive_int("elastic.distill.chunk_tokens", d.chunk_tokens)
    if isinstance(d.top_k, bool) or not isinstance(d.top_k, int) or not 0 <= d.top_k <= cfg.vocab_size:
        raise ConfigError("elastic.distill.top_k", d.top_k, f"must be an integer between 0 (full vocabulary) and {cfg.vocab_size}")
    if d.lm_loss_weight < 0:
        raise ConfigError("elastic.distill.lm_loss_weight", d.lm_loss_weight, "must be >= 0")
    if c.budget_probs is not None:
        probs = list(c.budget_probs)
        if len(probs) != len(budgets):
            raise ConfigError("elastic.curriculum.budget_probs", probs, f"needs one probability per budget ({len(budgets)}: {[b.name for b in budgets]})")
        if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise ConfigError("elastic.curriculum.budget_probs", probs, "must be non-negative and sum to 1")
    require_positive_int("elastic.curriculum.budgets_per_batch", c.budgets_per_batch)
    nonzero = len(budgets) if c.budget_probs is None else sum(p > 0 for p in c.budget_probs)
    if c.budgets_per_batch > nonzero:
        raise ConfigError("elastic.curriculum.budgets_per_batch", c.budgets_per_batch, f"must be <= the number of budgets with p > 0 ({nonzero})")
    require_positive_int("elastic.importance.calibration_batches", spec.importance.calibration_batches)
    return budgets
