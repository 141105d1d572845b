"""Small collectives shared by the CPU optimizer, the router update and importance scores."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor], group) -> None:
    """Average `tensors` over `group` in place, with one all-reduce of their concatenation."""
    world = dist.get_world_size(group)
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
