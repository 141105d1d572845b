"""Nested quantization-aware distillation (QAD): the elastic distillation step with the
student's linears fake-quantized (recipes/qad.yaml, recipes/qad_tiny.yaml).

Everything else is the elastic step (elastic/step.py): the trainer, the curriculum, the
KD loss, checkpoints and resume. What QAD changes:
- the student: every linear the recipe quantizes (quant/recipes.py) is fake-quantized
  with ONE set of scales for all budgets (quant/hooks.py), calibrated before the first
  step at every budget (or read from the starting checkpoint when it carries scales of
  this format, e.g. a previous QAD run), and saved in every checkpoint;
- the teacher: the BF16 elastic checkpoint at full width (`elastic.teacher_checkpoint`,
  which QAD also starts from unless `elastic.init_checkpoint` says otherwise);
- the budgets: the architectures the starting checkpoint resolved, router frozen. The
  scales are calibrated for those architectures and nested NVFP4 needs widths fixed in
  advance on 16-channel blocks, so QAD adapts the weights to the number format and
  leaves the architecture search to stages 1 and 2.
"""

from __future__ import annotations

from typing import Optional

from elastic_megatron.checkpoint.metadata import require_same_architecture
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.elastic.budgets import ResolvedBudget, recorded_budgets
from elastic_megatron.elastic.step import ElasticDistillStep
from elastic_megatron.models.forward import unwrap
from elastic_megatron.quant.calibrate import budget_axis_widths, calibrate_budgets
from elastic_megatron.quant.hooks import QuantHooks, attach
from elastic_megatron.quant.recipes import check_block_alignment


class QuantizedDistillStep(ElasticDistillStep):
    def __init__(self, job):
        super().__init__(job)
        q = job.quant
        key = "elastic.init_checkpoint" if self.spec.init_checkpoint else "elastic.teacher_checkpoint"
        start = self.spec.init_checkpoint or self.spec.teacher_checkpoint
        meta = require_same_architecture(self.cfg, start, key)
        try:
            recorded = recorded_budgets(meta, start)
        except ConfigError:
            raise ConfigError(key, start, "nested QAD starts from an elastic checkpoint (a stage 1 or stage 2 run dir), "
                              "which records its budgets' architectures; this one has none") from None
        names = [b.name for b in self.budgets]
        if [n for n, _ in recorded] != names:
            raise ConfigError("elastic.budgets", names, f"QAD trains the budgets {start} resolved: {[n for n, _ in recorded]}")
        if job.parallel.pp > 1:
            raise ConfigError("parallel.pp", job.parallel.pp, "nested QAD calibrates on one pipeline stage; allowed: 1")
        check_block_alignment(self.cfg, q.format, q.recipe, budget_axis_widths(recorded), "quant.format")
        # Pinned to the resolved architectures: no routed axis, so the router is neither
        # sampled nor stepped (its state is kept and saved as it was).
        self.budgets = [ResolvedBudget(b.name, b.target_kind, b.target, fixed=w, candidates={})
                        for b, (_, w) in zip(self.budgets, recorded)]
        found = meta.get("quantization")
        self.start_scales: Optional[dict] = found if found and (found.get("format"), found.get("recipe")) == (q.format, q.recipe) else None
        self.quant: Optional[QuantHooks] = None

    def setup(self, model, params_dtype) -> None:
        super().setup(model, params_dtype)
        self.quant = attach(unwrap(model), self.start_scales, self.job.quant.format, self.job.quant.recipe)

    def calibration_batches(self) -> int:
        return 0 if self.quant.calibrated else self.job.quant.calibration_batches

    def calibrate(self, model, batches: list[dict]) -> None:
        calibrate_budgets(unwrap(model), self.cfg, self.quant, list(self.resolved_widths().items()), batches, self.hooks)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "quantization": self.quant.record()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "quant": self.quant.record()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.quant.load(state["quant"])
