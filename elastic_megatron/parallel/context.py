"""Context parallelism: how a sequence is cut over the CP ranks and the few collectives
the model and the losses need for it.

Every sequence of s tokens is cut into 2 * cp equal chunks; CP rank r holds chunks r and
2 * cp - 1 - r, concatenated (Megatron's load-balanced split: under a causal mask every
rank then does the same attention work). Everything a rank computes per token (norms,
linears, MoE, the KD chunks) runs on its own tokens unchanged; only what mixes tokens
needs the others:

- attention gathers K and V of every rank (`gather_sequence`: all-gather forward,
  reduce-scatter backward) and attends causally by true position;
- the Mamba mixer moves to head parallelism for the convolution and the scan (all-to-all,
  Megatron-Core's MambaContextParallel; models/mamba_mixer.py);
- token means (losses) divide by the token count of the whole sequence (`token_count`),
  so each rank's loss is its share and the shares add up to the loss of the sequence.

Gradients of parameters are then summed over CP like over DP: Megatron's DDP averages
over the data-and-context group, so the step's loss is scaled by cp for backward
(parallel/pipeline.py), as Megatron's schedules do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def cp_group():
    return parallel_state.get_context_parallel_group()


def chunk_order(cp: int, rank: int) -> tuple[int, int]:
    """The two sequence chunks (of 2 * cp) that CP rank `rank` holds, in its local order."""
    return rank, 2 * cp - 1 - rank


def local_positions(seq_length: int, cp: int, rank: int) -> torch.Tensor:
    """Positions in the whole sequence of the tokens CP rank `rank` holds, in its order."""
    chunk = seq_length // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunk_order(cp, rank)])


def split_batch(batch: dict, cp: int | None = None, rank: int | None = None) -> dict:
    """This CP rank's part of a micro-batch: every [b, s] tensor keeps the rank's two
    chunks along the sequence (tokens, labels, loss mask and position ids alike)."""
    cp = cp_size() if cp is None else cp
    if cp == 1:
        return batch
    rank = parallel_state.get_context_parallel_rank() if rank is None else rank
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2:
            out[key] = value[:, local_positions(value.shape[1], cp, rank).to(value.device)]
        else:
            out[key] = value
    return out


def restore_order(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Chunks gathered rank by rank ([r0: c0, c_{2cp-1}], [r1: c1, c_{2cp-2}], ...) along
    dim 0 back into sequence order c0, c1, ..., c_{2cp-1}."""
    chunks = x.chunk(2 * cp, dim=0)
    # Gathered slot 2r holds chunk r, slot 2r + 1 holds chunk 2cp - 1 - r.
    slot = {c: (2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1) for c in range(2 * cp)}
    return torch.cat([chunks[slot[c]] for c in range(2 * cp)], dim=0)


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """[s / cp, ...] on each CP rank -> [s, ...] in sequence order on every rank. The
    backward pass sums each rank's gradient and returns every rank its own part."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp = cp_size()
    gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=cp_group())
    return restore_order(gathered, cp)


@torch.no_grad()
def token_count(loss_mask: torch.Tensor) -> torch.Tensor:
    """Tokens counted by `loss_mask` in the whole sequences (over every CP rank), >= 1."""
    count = loss_mask.to(torch.float32).sum()
    if cp_size() > 1:
        dist.all_reduce(count, group=cp_group())
    return count.clamp(min=1)


@torch.no_grad()
def sum_over_cp(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the CP ranks (each holds a share of a sequence's loss)."""
    if cp_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, group=cp_group())
    return out
