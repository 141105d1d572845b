"""Pipeline-parallel schedule: all forwards, then all backwards (GPipe), over the
micro-batches of one optimizer step.

Megatron-Core's schedules allocate their p2p buffers with `torch.cuda.current_device()`,
so they cannot run on CPU; this schedule uses plain `torch.distributed` send/recv
(gloo on CPU, NCCL on GPU) and works on both. What a stage computes is the step
function's `stage_forward(model, batch, step, received)`:

- `received` is the tensor from the previous stage (None on the first stage);
- on every stage but the last it returns the tensor to send on (one tensor per
  micro-batch; the elastic step stacks the teacher's and each budget's hidden states);
- on the last stage it returns (loss, metrics).

Each message is preceded by a small header (rank count, shape, dtype), so stages need
not agree on shapes in advance (the number of budgets per micro-batch, or a sequence-
parallel shard, decides them). Activations of all micro-batches are held until the
backward pass: memory grows with the number of micro-batches (1F1B would bound it by
the number of stages).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from elastic_megatron.parallel.context import cp_size, sum_over_cp

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pipeline_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def is_first_stage() -> bool:
    return parallel_state.is_pipeline_first_stage()


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _send(tensor: torch.Tensor, peer: int) -> None:
    header = torch.tensor([tensor.dim(), _DTYPES.index(tensor.dtype), *tensor.shape, *[0] * (8 - tensor.dim())],
                          dtype=torch.int64, device=tensor.device)
    dist.send(header, peer)
    dist.send(tensor.contiguous(), peer)


def _recv(peer: int) -> torch.Tensor:
    header = torch.empty(10, dtype=torch.int64, device=_device())
    dist.recv(header, peer)
    ndim, dtype = int(header[0]), _DTYPES[int(header[1])]
    out = torch.empty([int(x) for x in header[2:2 + ndim]], dtype=dtype, device=_device())
    dist.recv(out, peer)
    return out


def _next_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_next_rank()


def _prev_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_prev_rank()


def forward_backward(step_fn, model, batches: list[dict], step: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Forward and backward of every micro-batch in `batches`; gradients accumulate in
    the model (and the router) scaled by 1 / len(batches). Returns each micro-batch's
    loss and metrics on the last stage (empty lists elsewhere).

    Under context parallelism a step's loss is this rank's share of the sequences' loss;
    backward scales it by cp, because the gradient reductions average over the data-
    and context-parallel ranks together (Megatron's convention); the returned losses
    are the whole sequences' (shares summed over CP)."""
    n = len(batches)
    scale = cp_size() / n
    if pipeline_size() == 1:
        losses, metrics = [], []
        for batch in batches:
            loss, m = step_fn(model, batch, step)
            (loss * scale).backward()
            losses.append(loss.detach().float())
            metrics.append(m)
        return _whole_sequence(losses), metrics

    first, last = is_first_stage(), is_last_stage()
    saved: list[tuple[Optional[torch.Tensor], torch.Tensor]] = []
    losses, metrics = [], []
    for batch in batches:
        received = None if first else _recv(_prev_rank()).requires_grad_()
        out = step_fn.stage_forward(model, batch, step, received)
        if last:
            loss, m = out
            losses.append(loss.detach().float())
            metrics.append(m)
            saved.append((received, loss * scale))
        else:
            _send(out.detach(), _next_rank())
            saved.append((received, out))
    for received, out in saved:
        if last:
            out.backward()
        else:
            grad = _recv(_next_rank())
            torch.autograd.backward(out, grad)
        if not first:
            grad_in = received.grad if received.grad is not None else torch.zeros_like(received)
            _send(grad_in, _prev_rank())
    return _whole_sequence(losses), metrics


def _whole_sequence(losses: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-micro-batch loss shares summed over the CP ranks (one collective)."""
    if cp_size() == 1 or not losses:
        return losses
    return list(sum_over_cp(torch.stack(losses)).unbind())


def forward_only(stage_fn: Callable[[Optional[torch.Tensor]], torch.Tensor]) -> Optional[torch.Tensor]:
    """One no-grad pass through the stages: `stage_fn(received)` is this stage's part.
    Returns the last stage's output there and None on the other stages."""
    if pipeline_size() == 1:
        return stage_fn(None)
    received = None if is_first_stage() else _recv(_prev_rank())
    out = stage_fn(received)
    if is_last_stage():
        return out
    _send(out, _next_rank())
    return None


def from_last_stage(obj):
    """A picklable value computed on the last stage, given to every stage of this pipeline
    (stages that did not compute it pass anything)."""
    if pipeline_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]
