"""Step functions: what one micro-batch computes. The loop (training/loop.py) is the same
for every stage; pretraining plugs in `LMStep`, elastic distillation
`elastic.step.ElasticDistillStep` (chosen where the job is dispatched, train.py).

`StepFunction` is the whole contract. A subclass defines `stage_forward`; every other
hook has a default that does nothing, so the loop calls them all unconditionally:

    setup(model, dtype)         after the model and optimizer exist, before a resume
    calibration_batches()       micro-batches a fresh run needs before its first step (0: none)
    calibrate(model, batches)   given them (training data from its start; quantization scales)
    stage_forward(...)          one micro-batch on this pipeline stage (parallel/pipeline.py)
    after_step(step, ok)        after the optimizer step (ok: the update was applied)
    validate(model, batches, step)  validation metrics, `valid_loss` among them
    progress_lines(metrics)     extra console lines under a logged step
    validation_lines(metrics)   extra console lines under a validation
    checkpoint_meta()           merged into every checkpoint's metadata
    state_dict() / load_state_dict(state)   checkpointed as `extra`, restored on resume
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import parallel_state

from elastic_megatron.parallel.context import sum_over_cp, token_count
from elastic_megatron.parallel.pipeline import forward_only, from_last_stage


def masked_token_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens `loss_mask` keeps, of the whole sequences: under context
    parallelism this rank's share (the shares over CP ranks add up to the mean)."""
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / token_count(loss_mask).to(per_token.dtype)


class StepFunction:
    """Base class of the step functions (see the module docstring for the hooks)."""

    def setup(self, model, params_dtype: torch.dtype) -> None:
        """Called once after the model and optimizer are built, before any resume."""

    def calibration_batches(self) -> int:
        """Training micro-batches `calibrate` needs on a fresh run (not on a resume)."""
        return 0

    def calibrate(self, model, batches: list[dict]) -> None:
        """Called once, on a fresh run, before the first step."""

    def stage_forward(self, model, batch: dict, step: int, received: Optional[torch.Tensor]):
        """This pipeline stage's part of one micro-batch: the tensor to send on, or
        (scalar loss to backpropagate, metrics as python floats) on the last stage."""
        raise NotImplementedError

    def __call__(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch on a single pipeline stage: (loss, metrics)."""
        return self.stage_forward(model, batch, step, None)

    def after_step(self, step: int, ok: bool) -> None:
        """Called after every optimizer step (ok=False: the update was skipped)."""

    @torch.no_grad()
    def validate(self, model, batches: list[dict], step: int) -> dict[str, float]:
        """Validation metrics of this rank's `batches`, returned on every pipeline stage;
        the default is the mean of the step's own loss."""
        model.eval()
        try:
            losses = [forward_only(lambda received, b=batch: self.stage_forward(model, b, step, received)) for batch in batches]
        finally:
            model.train()
        losses = from_last_stage(sum_over_cp(torch.stack([loss[0].float() for loss in losses])) if losses[0] is not None else None)
        return {"valid_loss": losses.mean().item()}

    def progress_lines(self, metrics: dict) -> list[str]:
        """Extra console lines under a logged training step."""
        return []

    def validation_lines(self, metrics: dict) -> list[str]:
        """Extra console lines under a validation."""
        return []

    def checkpoint_meta(self) -> dict:
        """Merged into the metadata of every checkpoint."""
        return {}

    def state_dict(self) -> Optional[dict]:
        """State saved with every checkpoint as `extra` (None: nothing)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, on resume."""


class LMStep(StepFunction):
    """Next-token cross entropy (Megatron computes it vocab-parallel from the labels)."""

    def stage_forward(self, model, batch: dict, step: int, received):
        if received is not None:
            getattr(model, "module", model).set_input_tensor(received)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        if not parallel_state.is_pipeline_last_stage():
            return out
        loss = masked_token_mean(out.float(), batch["loss_mask"])
        return loss, {"lm_loss": sum_over_cp(loss).item()}
