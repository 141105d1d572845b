"""Small collectives shared by the CPU optimizer, the router update, importance scores, the
stop signal and checkpoint saves."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def all_reduce_sum_(tensors: list[torch.Tensor], group, scale: float = 1.0) -> None:
    """Sum `tensors` over `group` in place (times `scale`), with one all-reduce of their
    concatenation."""
    if not tensors:
        return
    if dist.get_world_size(group) == 1:
        if scale != 1.0:
            for t in tensors:
                t.mul_(scale)
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat *= scale
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a world of one: `flag`)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if torch.cuda.is_available():
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_reduce_mean_(tensors: list[torch.Tensor], group) -> None:
    """Average `tensors` over `group` in place."""
    all_reduce_sum_(tensors, group, 1.0 / dist.get_world_size(group))
