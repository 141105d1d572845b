"""Pure-PyTorch chunked Mamba2 SSD (state space duality) scan.

`ssd_chunk_scan` is the fallback for mamba_ssm's Triton kernel `mamba_chunk_scan_combined`
when that kernel cannot run (CPU tensors, or mamba_ssm not installed). Its signature and
semantics mirror the kernel's so `HybridMambaMixer` can swap one for the other:

    dt'     = clamp(softplus(dt + dt_bias))          (each step optional)
    state_t = exp(dt'_t * A_h) * state_{t-1} + dt'_t * outer(x_t, B_t[g])
    y_t     = (state_t @ C_t[g] + D_h * x_t) * silu(z_t)

per head h with group g = h // (nheads // ngroups); state_t is (headdim, dstate).

The chunked algorithm splits time into chunks of `chunk_size` steps:
  1. inside a chunk, outputs come from the quadratic "attention" form
     y_i = sum_{j<=i} (C_i . B_j) * exp(dA_{j+1} + ... + dA_i) * dt_j * x_j;
  2. each chunk's own end state (as if it started from zero) is a weighted sum of its inputs;
  3. a short recurrence over chunks carries the state from chunk to chunk, scaled by the
     chunk's total decay;
  4. each position adds the state entering its chunk, decayed to that position.
Decays are only ever exp of sums of dt*A <= 0 (masked with -inf where they do not apply), so
nothing overflows. Autograd differentiates it directly; it is O(L * chunk_size) in memory,
meant for CPU tests and small runs, not for speed.

The tests hold it equal to a naive step-by-step loop over time (tests/ssd_reference.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunk_scan"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision inputs would lose the decays' precision; run those in float32.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _check_shapes(x, dt, A, B, C, chunk_size) -> tuple[int, int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"dt must be {(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be ({nheads},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be (batch, seqlen, ngroups, dstate); got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return batch, seqlen, nheads, headdim, ngroups, dstate


def _apply_D_z(y, x, D, z, dtype):
    """y + D * x, then gated by silu(z) (the kernel's order)."""
    if D is not None:
        D = D.to(dtype)
        # D per head broadcasts over headdim; D per (head, channel) matches x's last two dims.
        y = y + x * (D.unsqueeze(-1) if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[j+1] + ... + a[i] for i >= j (0 on the diagonal), -inf for i < j.

    Summing the masked values directly (instead of cumsum[i] - cumsum[j]) avoids cancellation
    between two large partial sums; the -inf above the diagonal makes exp() give exactly 0
    there, so exp() never sees the positive sums of the acausal half.
    """
    T = a.size(-1)
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    # rows[..., i, j] = a[i], kept only where i > j: summing down rows gives a[j+1..i].
    rows = a.unsqueeze(-1).expand(*a.shape, T)
    rows = rows.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)
    seg = rows.cumsum(dim=-2)
    return seg.masked_fill(~torch.tril(ones), -math.inf)


def ssd_chunk_scan(
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
    """Chunked Mamba2 SSD scan, a drop-in for mamba_ssm's `mamba_chunk_scan_combined`.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads), raw (before dt_bias / softplus).
        A: (nheads,), negative (A = -exp(A_log)).
        B, C: (batch, seqlen, ngroups, dstate); nheads must be a multiple of ngroups.
        chunk_size: steps per chunk; seqlen need not be a multiple of it.
        D: optional (nheads,) or (nheads, headdim) skip connection, y += D * x.
        z: optional (batch, seqlen, nheads, headdim) gate, y *= silu(z) (after D).
        dt_bias: optional (nheads,), added to dt before softplus.
        dt_softplus: apply softplus to dt (after dt_bias).
        dt_limit: clamp dt to this range (after softplus); (0, inf) means no clamp.
        initial_states: optional (batch, nheads, headdim, dstate) state before step 0.
        return_final_states: also return the state after the last step.

    Returns:
        y (batch, seqlen, nheads, headdim) in x's dtype, and with `return_final_states`
        a tuple (y, final_states) with final_states (batch, nheads, headdim, dstate) in the
        compute dtype (float32 for half-precision inputs, like the kernel's float32 states).
    """
    batch, seqlen, nheads, headdim, ngroups, dstate = _check_shapes(x, dt, A, B, C, chunk_size)
    out_dtype = x.dtype
    dtype = _compute_dtype(x)
    x_in = x.to(dtype)
    x, dt, A, B, C = x_in, dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)

    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    # Every head reads its group's B and C.
    heads_per_group = nheads // ngroups
    B = B.repeat_interleave(heads_per_group, dim=2)  # (b, L, h, n)
    C = C.repeat_interleave(heads_per_group, dim=2)

    # Pad time to whole chunks. Padding dt (after bias/softplus/clamp) with 0 gives padded steps
    # decay exp(0 * A) = 1 and input 0 * x = 0, so they leave the state as it was at the last
    # real step: the last chunk's end state is the final state.
    pad = (-seqlen) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size
    # (b, L, ...) -> (b, c, l, ...): c chunks of l steps.
    x, B, C, dt = (t.unflatten(1, (nchunks, chunk_size)) for t in (x, B, C, dt))

    dA = (dt * A).permute(0, 3, 1, 2)  # (b, h, c, l); <= 0 for A < 0, dt >= 0
    dA_cumsum = dA.cumsum(dim=-1)  # decay from the chunk's start through step i
    xdt = x * dt.unsqueeze(-1)  # each step's input, dt * x  (b, c, l, h, p)

    # 1. Within a chunk: decay[i, j] = exp(dA[j+1] + ... + dA[i]) for j <= i, else 0.
    decay = torch.exp(_segsum(dA))  # (b, h, c, l, l)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. Each chunk's end state from its own inputs: input j decays from j+1 to the chunk's
    # last step, i.e. the last row of `decay`.
    decay_to_end = decay[..., -1, :]  # (b, h, c, l)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)

    # 3. Across chunks: the state entering chunk c+1 is the one entering chunk c decayed by
    # chunk c's total, plus chunk c's own state. Written as one segsum matrix over chunks
    # (with the initial state as chunk "-1") so it needs no loop and no in-place updates.
    if initial_states is None:
        initial_states = x.new_zeros(batch, nheads, headdim, dstate)
    states = torch.cat([initial_states.to(dtype).unsqueeze(1), chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_totals = F.pad(dA_cumsum[..., -1], (1, 0))  # (b, h, c+1); chunk "-1" has no decay
    chunk_decay = torch.exp(_segsum(chunk_totals))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states_in, final_states = states[:, :-1], states[:, -1]  # entering each chunk; after the last

    # 4. Each position reads the state entering its chunk, decayed to that position.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states_in, torch.exp(dA_cumsum))

    y = y.flatten(1, 2)[:, :seqlen]
    y = _apply_D_z(y, x_in, D, z, dtype).to(out_dtype)
    return (y, final_states) if return_final_states else y
