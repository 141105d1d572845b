"""Decoding caches of the two modules of the hybrid model that carry state over time.

Everything else in the model is per token (norms, projections, MLP, MoE) and runs as it
does in training. The decoder (elastic_megatron/inference/decoder.py) attaches one cache
to each `SDPACoreAttention` and `HybridMambaMixer` (their `decode_cache` attribute) and
runs Megatron's ordinary forward, first over the prompt (prefill), then one token at a
time. Megatron-Core 0.16's own inference contexts are not used: they allocate on CUDA,
its Mamba decode path needs mamba_ssm's CUDA extension, and budgets run on narrow views
of one set of weights, which Megatron's static inference buffers know nothing about.

Batches of prompts of different lengths are left-padded: every sequence then decodes at
the same cache position. `Padding.pad` marks the padded positions of the current chunk;
they are made invisible: attention never reads their keys, Mamba's conv sees zeros
there (as at the start of a sequence) and its scan a step of length dt = 0 (no decay,
no input), so a padded prompt gives exactly the states of the unpadded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Padding:
    """Shared by every cache of one decode: which positions of the current chunk are padding."""

    pad: Optional[torch.Tensor] = None  # [batch, chunk] bool, True = padding; None = none


@dataclass
class AttentionCache:
    """Keys and values of every position so far, grouped-query layout [b, max_len, groups, hd]."""

    keys: torch.Tensor
    values: torch.Tensor
    key_pad: torch.Tensor  # [b, max_len] bool: padded positions, never attended to
    padding: Padding
    length: int = 0

    @classmethod
    def empty(cls, batch: int, max_len: int, groups: int, head_dim: int, dtype, device, padding: Padding) -> "AttentionCache":
        shape = (batch, max_len, groups, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, dtype=torch.bool, device=device), padding)


@dataclass
class MambaCache:
    """The last conv_kernel - 1 inputs of the causal conv, and the SSM state."""

    conv: Optional[torch.Tensor] = None  # [b, conv_dim, kernel - 1]
    ssm: Optional[torch.Tensor] = None  # [b, heads, head_dim, state], fp32
    padding: Optional[Padding] = None
