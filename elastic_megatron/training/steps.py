"""Step functions: what one micro-batch computes. The loop is the same for every stage;
pretraining uses `LMStep`, later stages plug in distillation and the router."""

from __future__ import annotations

from typing import Protocol

import torch


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
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss = masked_token_mean(per_token.float(), batch["loss_mask"])
        return loss, {"lm_loss": loss.item()}
