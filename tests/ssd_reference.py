"""The naive Mamba2 recurrence, one time step at a time: the ground truth the chunked SSD
scan (elastic_megatron/models/ssd.py) and the Triton kernel are tested against."""

from __future__ import annotations

from typing import Optional

import torch

from elastic_megatron.models.ssd import _apply_D_z, _check_shapes, _compute_dtype


def ssd_reference_recurrence(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
):
    """Naive step-by-step Mamba2 recurrence; same signature and outputs as `ssd_chunk_scan`.

    `chunk_size` is accepted for signature parity and ignored. Slow (a Python loop over
    time): ground truth for tests only.
    """
    batch, seqlen, nheads, headdim, ngroups, dstate = _check_shapes(x, dt, A, B, C, max(chunk_size, 1))
    out_dtype = x.dtype
    dtype = _compute_dtype(x)
    x, dt, A, B, C = x.to(dtype), dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    heads_per_group = nheads // ngroups
    no_limit = tuple(dt_limit) == (0.0, float("inf"))

    state = (
        initial_states.to(dtype)
        if initial_states is not None
        else x.new_zeros(batch, nheads, headdim, dstate)
    )
    ys = []
    for t in range(seqlen):
        dt_t = dt[:, t]  # (b, h)
        if dt_bias is not None:
            dt_t = dt_t + dt_bias.to(dtype)
        if dt_softplus:
            dt_t = torch.log1p(torch.exp(dt_t))
        if not no_limit:
            dt_t = torch.clamp(dt_t, dt_limit[0], dt_limit[1])
        B_t = B[:, t].repeat_interleave(heads_per_group, dim=1)  # (b, h, n)
        C_t = C[:, t].repeat_interleave(heads_per_group, dim=1)
        decay_t = torch.exp(dt_t * A)[:, :, None, None]
        update = dt_t[:, :, None, None] * x[:, t, :, :, None] * B_t[:, :, None, :]  # (b, h, p, n)
        state = decay_t * state + update
        ys.append((state * C_t[:, :, None, :]).sum(-1))  # state @ C_t
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, nheads, headdim)
    y = _apply_D_z(y, x, D, z, dtype).to(out_dtype)
    return (y, state) if return_final_states else y
