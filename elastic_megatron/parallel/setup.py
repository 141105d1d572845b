"""Process-group setup: torch.distributed plus Megatron-Core's model-parallel groups.

Ranks come from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or from Slurm (SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID); a plain `python` call is a world of one. The backend is
NCCL on GPU and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def dist_env() -> DistEnv:
    """Rank, world size and local rank from torchrun or Slurm variables (else 0/1/0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    seed: int = 1234,
    expert_tensor_parallel: int | None = None,
    context_parallel: int = 1,
) -> DistEnv:
    """Initialise torch.distributed and Megatron's parallel state once per process."""
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    env = dist_env()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        if env.world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # A world of one rendezvous on a private port (never an inherited MASTER_PORT);
            # under torchrun it uses the launcher's store like any world.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            expert_model_parallel_size=expert_parallel,
            expert_tensor_parallel_size=expert_tensor_parallel,
            context_parallel_size=context_parallel,
        )
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mcore_tp.model_parallel_cuda_manual_seed(seed)
    return env


@contextlib.contextmanager
def distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1, seed: int = 1234,
                expert_tensor_parallel: int | None = None, context_parallel: int = 1):
    """Initialise for the duration of a job; tear down only what this call set up, so a
    job run inside an already-initialised process (tests, notebooks) leaves it intact."""
    owns = not dist.is_initialized()
    env = initialize_distributed(tensor_parallel, pipeline_parallel, expert_parallel, seed, expert_tensor_parallel,
                                 context_parallel)
    try:
        yield env
    finally:
        if owns:
            destroy_distributed()


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
