"""Elastic spec schema (recipes/elastic/*.yaml) and the checks of its settings.

An elastic spec names the nested budgets. Each budget has a target (total parameters,
active parameters or bf16 weight bytes) and either pinned widths (its architecture is
fixed) or, per axis, candidate widths the router chooses from; axes a budget does not
mention stay at the parent's width. Budgets are listed largest first.

The budgets themselves are resolved and checked against the model's width axes in
`elastic_megatron.elastic.budgets` (that needs the axis arithmetic); this module checks
everything else (router, distillation, curriculum) as part of `validate_job`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from elastic_megatron.config.errors import ConfigError, require_choice, require_positive_int
from elastic_megatron.config.model import ModelConfig

TEMPERATURE_SCHEDULES = ("exponential", "linear", "constant")


@dataclass
class BudgetConfig:
    # How the budget is named on the command line and in checkpoints (e.g. small, 23B, full).
    name: str = "full"
    # What `target` measures: total_params | active_params | memory_bytes.
    target_kind: str = "total_params"
    # Target value in units of target_kind; null for a pinned budget = its own cost.
    target: Optional[float] = None
    # Pinned widths, axis -> width, or a list with one width per layer carrying the axis.
    widths: dict[str, Any] = field(default_factory=dict)
    # Router candidates, axis -> widths to choose from.
    candidates: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RouterConfig:
    # Width of the router MLP that picks each budget's widths.
    hidden_size: int = 64
    # Router learning rate = trainer.lr * lr_mult (constant), Adam.
    lr_mult: float = 10.0
    # Gumbel-Softmax temperature, annealed from start to end over trainer.max_steps.
    temperature_start: float = 1.0
    # The temperature reached at trainer.max_steps.
    temperature_end: float = 0.1
    # exponential | linear | constant.
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
    # Softmax temperature of teacher and student logits in the KD loss.
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
    # Training micro-batches the parent's activations are scored on.
    calibration_batches: int = 16
    # Write PNG plots of the importance scores into run.dir.
    plots: bool = True


@dataclass
class ElasticConfig:
    # false: plain training of one model (pretraining).
    enabled: bool = False
    # The spec's name (recipes/elastic/<name>.yaml), recorded in checkpoints.
    name: str = "none"
    # The nested models, listed largest first.
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
    # Separate distillation (recipes/distill*.yaml): train only this budget of `budgets`,
    # pinned, as ONE fixed-size student (the baseline the nested models are compared
    # with); null = every budget nested in one model (stages 1 and 2).
    student_budget: Optional[str] = None


def validate_elastic_settings(spec: ElasticConfig, cfg: ModelConfig) -> None:
    """Router, distillation, curriculum and importance settings: everything but the
    budgets' widths, which `elastic.budgets.resolve_budgets` checks."""
    if not spec.budgets:
        raise ConfigError("elastic.budgets", [], "needs at least one budget (see recipes/elastic/tiny.yaml)")
    if cfg.backend != "local":
        raise ConfigError("model.backend", cfg.backend, "elastic masks hook the local backend's separate norms; allowed: local")
    r, d, c = spec.router, spec.distill, spec.curriculum
    if spec.student_budget is not None:
        names = [b.name for b in spec.budgets]
        if spec.student_budget not in names:
            raise ConfigError("elastic.student_budget", spec.student_budget, f"is not a budget of elastic.budgets; allowed: {names}")
        student = spec.budgets[names.index(spec.student_budget)]
        if student.candidates:
            raise ConfigError("elastic.student_budget", spec.student_budget,
                              "has router candidates; a separately distilled student has one fixed architecture: "
                              "pin its widths (elastic.budgets[i].widths), e.g. to what an elastic run resolved")
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
        if len(probs) != len(spec.budgets):
            raise ConfigError("elastic.curriculum.budget_probs", probs, f"needs one probability per budget ({len(spec.budgets)}: {[b.name for b in spec.budgets]})")
        if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise ConfigError("elastic.curriculum.budget_probs", probs, "must be non-negative and sum to 1")
    require_positive_int("elastic.curriculum.budgets_per_batch", c.budgets_per_batch)
    nonzero = len(spec.budgets) if c.budget_probs is None else sum(p > 0 for p in c.budget_probs)
    if c.budgets_per_batch > nonzero:
        raise ConfigError("elastic.curriculum.budgets_per_batch", c.budgets_per_batch, f"must be <= the number of budgets with p > 0 ({nonzero})")
    require_positive_int("elastic.importance.calibration_batches", spec.importance.calibration_batches)
