"""Every runtime patch of Megatron-Core this project needs, in one place.

Megatron-Core (checked against 0.16.1) assumes CUDA and, in a few places, Transformer
Engine. Whatever a ModuleSpec can replace is replaced there (core attention, norms, the
Mamba mixer: see `specs.py`). What remains is patched here, one function per problem,
each saying what it works around and when it applies:

- `_patch_checkpoint_results_queue` applies everywhere (no orphaned processes).
- CUDA-only patches apply when `torch.cuda.is_available()` is False.
- TE-only patches apply when Transformer Engine is not importable (CPU machines, and GPU
  machines without TE such as the lent test GPU).

`apply()` is idempotent and is called by `build_model` before any module is built.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

log = logging.getLogger(__name__)
_applied: set[str] = set()


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _patch_router_gating_device() -> None:
    """TopKRouter.gating moves a CPU router weight to `torch.cuda.current_device()`
    (megatron/core/transformer/moe/router.py, 0.16). Without CUDA, keep it where it is."""
    from megatron.core.transformer.moe.router import Router

    original = Router.gating

    @functools.wraps(original)
    def gating(self, input):
        if self.weight.device.type == "cpu" and input.device.type == "cpu":
            router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
            from megatron.core.transformer.moe.moe_utils import router_gating_linear

            return router_gating_linear(input, self.weight, self.bias, router_dtype)
        return original(self, input)

    Router.gating = gating


@contextlib.contextmanager
def _current_device_is_cpu():
    """Make `torch.cuda.current_device()` answer 'cpu' inside the block (CPU-only torch
    raises there). Used only to wrap Megatron functions that allocate small bookkeeping
    tensors with device=torch.cuda.current_device()."""
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = saved


def _on_cpu_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _current_device_is_cpu():
            return fn(*args, **kwargs)

    return wrapper


def _patch_router_buffers_device() -> None:
    """TopKRouter.__init__ registers expert_bias and token-count buffers on
    `torch.cuda.current_device()` (transformer/moe/router.py, 0.16)."""
    from megatron.core.transformer.moe.router import TopKRouter

    TopKRouter.__init__ = _on_cpu_device(TopKRouter.__init__)


def _patch_tensor_parallel_buffers_device() -> None:
    """Sequence-parallel gathers/reduce-scatters allocate their outputs and the global
    gather buffer on `torch.cuda.current_device()` (tensor_parallel/mappings.py,
    layers.py, utils.GlobalMemoryBuffer, 0.16); TP/SP on CPU (gloo) needs them on CPU."""
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings

    for name in ("_gather_along_last_dim", "_gather_along_first_dim", "_reduce_scatter_along_first_dim"):
        setattr(mappings, name, _on_cpu_device(getattr(mappings, name)))
    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    linear.forward = staticmethod(_on_cpu_device(linear.forward))
    linear.backward = staticmethod(_on_cpu_device(linear.backward))
    utils.GlobalMemoryBuffer.get_tensor = _on_cpu_device(utils.GlobalMemoryBuffer.get_tensor)


def _patch_rng_tracker_fork() -> None:
    """Megatron forks its CUDA RNG tracker around sequence-parallel dropout regions
    (e.g. the embedding, tensor_parallel/random.py, 0.16); a CPU-only torch has no CUDA
    RNG to fork, and CPU dropout draws from torch's default generator."""
    import contextlib

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker.fork = contextlib.contextmanager(lambda self, name=None: (yield))


def _patch_checkpoint_finalize_device() -> None:
    """save_state_dict_async_finalize broadcasts a failure flag allocated on
    `torch.cuda.current_device()` (dist_checkpointing/strategies/state_dict_saver.py, 0.16)."""
    from megatron.core.dist_checkpointing.strategies import state_dict_saver, torch as torch_strategy

    wrapped = _on_cpu_device(state_dict_saver.save_state_dict_async_finalize)
    state_dict_saver.save_state_dict_async_finalize = wrapped
    torch_strategy.save_state_dict_async_finalize = wrapped


def _patch_te_general_gemm() -> None:
    """moe_utils.router_gating_linear reads the module global `te_general_gemm`, which is
    only defined when the TE import succeeded (moe_utils.py, 0.16): NameError without TE.
    Define it as None so the plain torch matmul path is taken."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_mamba_stack_final_norm() -> None:
    """MambaStack builds its final norm with `TENorm` unconditionally (ssm/mamba_block.py,
    0.16), which raises ImportError without TE. Use our RMSNorm, same parameter name."""
    from megatron.core.ssm import mamba_block

    from elastic_megatron.models.norms import RMSNorm

    mamba_block.TENorm = RMSNorm


def _disable_jit_fuser_compile() -> None:
    """megatron.core.jit sets `jit_fuser = torch.compile` (0.16), so small elementwise
    functions (squared_relu, bias-dropout-add, MoE score helpers) are compiled by inductor
    on their first call: ~15 s of C++ compilation per process on CPU for no gain. Run
    them eagerly when there is no GPU."""
    import torch._dynamo

    torch._dynamo.config.disable = True


def _patch_checkpoint_preload_sync() -> None:
    """FileSystemWriterAsync.preload_tensors copies tensors to host with non_blocking=True
    and then calls torch.cuda.synchronize() (dist_checkpointing/strategies/
    filesystem_async.py, 0.16), which raises without CUDA. On CPU the copy is already
    synchronous: preload with non_blocking=False."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.preload_tensors

    def preload_tensors(write_buckets, non_blocking=True):
        return original(write_buckets, non_blocking=False)

    FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)


def _patch_checkpoint_results_queue() -> None:
    """Megatron's torch_dist writer collects its workers' results through a queue served by
    a `multiprocessing.Manager` (dist_checkpointing/strategies/filesystem_async.py, 0.16):
    a spawned server process that outlives a trainer killed with SIGKILL (seen: orphans of
    ~390 MB each). Our saves are synchronous: the trainer itself puts the results in and
    takes them out (right away, with get_nowait), so an in-process thread-safe queue is
    the exact fit and leaves no server behind. (A multiprocessing.Queue is not: its put
    goes through a feeder thread and races that get_nowait.) The forked writer processes
    themselves die with the trainer (checkpoint/store.py)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: results


def apply() -> None:
    """Apply the patches this machine needs (idempotent)."""
    needed = [_patch_checkpoint_results_queue]
    if not torch.cuda.is_available():
        needed += [_patch_router_gating_device, _patch_router_buffers_device, _disable_jit_fuser_compile,
                   _patch_checkpoint_preload_sync, _patch_checkpoint_finalize_device, _patch_tensor_parallel_buffers_device,
                   _patch_rng_tracker_fork]
    if not have_transformer_engine():
        needed += [_patch_te_general_gemm, _patch_mamba_stack_final_norm]
    for patch in needed:
        if patch.__name__ not in _applied:
            patch()
            _applied.add(patch.__name__)
            log.debug("applied Megatron-Core compat patch %s", patch.__name__)
    if torch.cuda.is_available() and not have_transformer_engine() and "te_note" not in _applied:
        _applied.add("te_note")
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print("note: Transformer Engine is not installed: Megatron-Core's local modules, Torch norms and "
                  "optimizers are used (model.backend=te needs it)", flush=True)
