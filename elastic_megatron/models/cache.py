"""Decoding caches of the two modules of the hybrid model that carry state over time.

Everything else in the model is per token (norms, projections, MLP, MoE).

- `DecodeState`: the preallocated caches of one decoder (inference/decoder.py) for up to
  `slots` sequences of up to `max_len` positions each: keys and values of every attention
  layer, conv inputs and SSM state of every Mamba layer, and which slots hold a sequence
  and how long each is. Slots are independent: a sequence is prefilled into a free slot,
  decoded with the others one token per step, and released, at any time between steps;
  nothing is reallocated while decoding (so a decode step has static shapes and can be
  captured in a CUDA graph).

Megatron-Core's own inference contexts are not used: they allocate on CUDA, its Mamba
decode path needs mamba_ssm's CUDA extension, and budgets run on narrow views of one set
of weights, which Megatron's static inference buffers know nothing about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class CacheShapes:
    """Per-sequence cache shapes of one model: (groups, head_dim) of each attention layer
    and (conv_dim, conv_kernel - 1, heads, head_dim, state) of each Mamba layer."""

    attention: tuple[tuple[int, int], ...]
    mamba: tuple[tuple[int, int, int, int, int], ...]


class DecodeState:
    """Preallocated caches of up to `slots` sequences of up to `max_len` positions.

    Storage (slot-major, so a slot's rows are one index):
      keys[i], values[i]  [slots, groups, max_len, head_dim]   attention layer i
      conv[j]             [slots, conv_dim, kernel - 1]        Mamba layer j
      ssm[j]              [slots, heads, head_dim, state] fp32 Mamba layer j
    Bookkeeping: `lengths[s]` positions filled in slot s (host list), `positions` the same
    on the device (what a step reads when slots differ in length), `active` the slots
    holding a sequence (`live`: the same as 0/1 on the device).
    A decode step covers rows 0 .. span - 1 (span: one past the highest active slot; all
    `slots` when captured in a CUDA graph); rows of free slots compute values nobody reads.
    """

    def __init__(self, shapes: CacheShapes, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a decode state needs at least one slot and one position (got {slots} slots, {max_len} positions)")
        self.slots, self.max_len, self.device = slots, max_len, device
        self.keys = [torch.zeros(slots, g, max_len, hd, dtype=dtype, device=device) for g, hd in shapes.attention]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.conv = [torch.zeros(slots, c, k, dtype=dtype, device=device) for c, k, _, _, _ in shapes.mamba]
        self.ssm = [torch.zeros(slots, h, p, n, dtype=torch.float32, device=device) for _, _, h, p, n in shapes.mamba]
        self.lengths = [0] * slots
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.live = torch.zeros(slots, dtype=torch.long, device=device)  # 1 for an active slot: what a step adds to positions
        self.active = [False] * slots
        self.rows = torch.arange(slots, device=device)
        self.arange = torch.arange(max_len, device=device)
        self.graph = None  # the captured decode step (inference/decoder.py), when one was captured

    # ---- slots ------------------------------------------------------------------------------

    @property
    def span(self) -> int:
        """Rows a decode step covers: one past the highest active slot."""
        for s in range(self.slots - 1, -1, -1):
            if self.active[s]:
                return s + 1
        return 0

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if not self.active[s]]

    def acquire(self) -> int:
        """The lowest free slot, marked active (its contents are set by the prefill)."""
        for s in range(self.slots):
            if not self.active[s]:
                self.active[s] = True
                self.live[s] = 1
                self._set_length(s, 0)
                return s
        raise RuntimeError(f"all {self.slots} slots of this decode state hold a sequence")

    def release(self, slot: int) -> None:
        """The sequence in `slot` is done: the slot is free for the next prefill at once."""
        if not 0 <= slot < self.slots or not self.active[slot]:
            raise ValueError(f"slot {slot} holds no sequence")
        self.active[slot] = False
        self.live[slot] = 0
        self._set_length(slot, 0)

    def _set_length(self, slot: int, length: int) -> None:
        self.lengths[slot] = length
        self.positions[slot] = length

    def store(self, slots: Sequence[int], length: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
              conv: Sequence[torch.Tensor], ssm: Sequence[torch.Tensor]) -> None:
        """Write a prefill's caches (batch-major, one row per slot in `slots`, `length`
        positions each: keys/values [b, length, groups, hd]) into the slots."""
        if length > self.max_len:
            raise ValueError(f"a prompt of {length} tokens does not fit the {self.max_len} positions of this decode state")
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        for store, new in zip(self.keys + self.values, list(keys) + list(values)):
            store[index, :, :length] = new.transpose(1, 2).to(store.dtype)
        for store, new in zip(self.conv + self.ssm, list(conv) + list(ssm)):
            store[index] = new.to(store.dtype)
        for s in slots:
            self._set_length(s, length)

    def advance(self, rows: int) -> None:
        """Host bookkeeping after a decode step over rows 0 .. rows - 1 (the device
        positions are advanced by the step itself)."""
        for s in range(rows):
            if self.active[s]:
                self.lengths[s] += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + self.conv + self.ssm)
