"""Forward helpers of the hybrid model that the step functions share.

Megatron's `MambaModel.forward` runs embedding -> decoder -> output layer in one call;
distillation needs the decoder output without the output layer (the KD loss runs the
output layer chunk by chunk, so neither model's full-vocabulary logits exist at once).
"""

from __future__ import annotations

from typing import Optional

import torch


def unwrap(model):
    """The MambaModel inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def stage_hidden(model, tokens: torch.Tensor, position_ids: torch.Tensor, received: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This pipeline stage's decoder output, [s, b, h] ([s / tp, b, h] under sequence
    parallelism): MambaModel.forward up to the output layer. The first stage embeds
    `tokens`; later ones start from `received`; the last stage's output is after the
    final norm."""
    m = unwrap(model)
    if m.pre_process:
        return m.decoder(hidden_states=m.embedding(input_ids=tokens, position_ids=position_ids), attention_mask=None)
    m.decoder.set_input_tensor(received)
    return m.decoder(hidden_states=None, attention_mask=None)


def output_layer(model):
    """The (vocab-parallel) output layer of the last pipeline stage."""
    return unwrap(model).output_layer
