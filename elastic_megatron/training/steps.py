"""Step functions: what one micro-batch computes. The loop is the same for every stage;
pretraining uses `LMStep`, later stages plug in distillation and the router."""

from __future__ import annotations

from typing import Protocol

import torch

from megatron.core import parallel_state


class StepFunction(Protocol):
    def __call__(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Return (scalar loss to backpropagate, metrics as python floats)."""
        ...


def masked_token_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class LMStep:
    """Next-token cross entropy (Megatron computes it vocab-parallel from the labels)."""

    def __call__(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        return self.stage_forward(model, batch, step, None)

    def stage_forward(self, model, batch: dict, step: int, received):
        """This pipeline stage's part: hidden states to send on, or (loss, metrics) on the
        last stage (see parallel/pipeline.py)."""
        if received is not None:
            getattr(model, "module", model).set_input_tensor(received)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        if not parallel_state.is_pipeline_last_stage():
            return out
        loss = masked_token_mean(out.float(), batch["loss_mask"])
        return loss, {"lm_loss": loss.item()}
