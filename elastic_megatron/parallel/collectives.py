"""Small collectives shared by the CPU optimizer, the router update, importance scores, the
stop signal, checkpoint saves and checkpoint hashing."""

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


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one, and under the
    dry run's simulated ("fake") group, which communicates nothing."""
    if not dist.is_initialized() or dist.get_backend() == "fake":
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def broadcast_from_rank0(obj):
    """Rank 0's `obj` (picklable) on every rank."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean_(tensors: list[torch.Tensor], group) -> None:
    """Average `tensors` over `group` in place."""
    all_reduce_sum_(tensors, group, 1.0 / dist.get_world_size(group))
