"""Every runtime patch of Megatron-Core this project needs, and every difference between
the Megatron-Core versions it supports, in one place.

Supported: Megatron-Core 0.16.1 through 0.19.x (tested: 0.16.1 on Python 3.11, 0.19.2 on
Python 3.12). Each version difference is one function below that names the versions it
applies to (`MCORE_VERSION`, `mcore_at_least`):

- `hybrid_model_class` / `hybrid_stack_classes` / `hybrid_model_kwargs`: 0.18 renamed
  `MambaModel`/`MambaStack` (megatron/core/models/mamba, ssm/mamba_block.py) to
  `HybridModel`/`HybridStack` (megatron/core/models/hybrid/) and kept the old names as
  deprecated wrappers that warn; the layer pattern argument became `hybrid_layer_pattern`
  in 0.17 and the stack spec argument `hybrid_stack_spec` in 0.18.
- `mamba_context_parallel`: `MambaContextParallel` takes the conv1d module up to 0.18, its
  weight, bias and padding from 0.19.
- `_patch_checkpoint_results_queue`: the dist-checkpoint writer's results-queue getter was
  renamed in 0.17 (and its writers became threads).
- `write_common_state_file`: 0.19 keeps a checkpoint's common state inside the torch_dist
  shards and writes no `common.pt`, which 0.16-0.18 need; every checkpoint gets one (and
  0.19's note that reading it is deprecated is dropped in `elastic_megatron/__init__.py`,
  which runs before anything reads a checkpoint).
- `_patch_mamba_stack_final_norm` patches the module that builds the stack's final norm
  (ssm/mamba_block.py before 0.18, models/hybrid/hybrid_block.py from 0.18).
- `whole_layer_cuda_graph_scope`: `TransformerConfig`'s CUDA graph scope is
  `cuda_graph_scope` up to 0.17 and `cuda_graph_modules` from 0.18; both default to the
  deprecated "full", which warns on every config.
- `dense_mlp_submodule`: a dense MLP layer's MLP is a `MLP.as_mlp_submodule` partial from
  0.18 (a `ModuleSpec` of `MLP` is rewrapped with a logged warning), a `ModuleSpec` before.

Megatron-Core assumes CUDA and, in a few places, Transformer Engine. Whatever a ModuleSpec can replace is replaced there (core attention, norms, the
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

# The oldest and the first unsupported Megatron-Core release (pyproject.toml says the same).
SUPPORTED_MCORE = ((0, 16, 1), (0, 20, 0))


def _installed_mcore_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    return int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH)


MCORE_VERSION = _installed_mcore_version()


def mcore_at_least(major: int, minor: int, patch: int = 0) -> bool:
    return MCORE_VERSION >= (major, minor, patch)


def check_mcore_version() -> None:
    """Refuse a Megatron-Core outside the tested range before building anything."""
    low, high = SUPPORTED_MCORE
    if not low <= MCORE_VERSION < high:
        from elastic_megatron.config.errors import ConfigError

        raise ConfigError("megatron-core", ".".join(map(str, MCORE_VERSION)),
                          f">= {'.'.join(map(str, low))} and < {'.'.join(map(str, high))} (the tested range)")


def hybrid_model_class():
    """The hybrid language model class: `HybridModel` from 0.18 (models/hybrid/hybrid_model.py;
    `MambaModel` there is a deprecated wrapper that warns), `MambaModel` in 0.16 and 0.17."""
    if mcore_at_least(0, 18):
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        return HybridModel
    from megatron.core.models.mamba.mamba_model import MambaModel

    return MambaModel


def hybrid_stack_classes():
    """(stack, its submodules dataclass): `HybridStack`/`HybridStackSubmodules` from 0.18
    (models/hybrid/hybrid_block.py), `MambaStack`/`MambaStackSubmodules` in 0.16 and 0.17."""
    if mcore_at_least(0, 18):
        from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules

        return HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules

    return MambaStack, MambaStackSubmodules


def hybrid_model_kwargs(stack_spec, pattern: str) -> dict:
    """The model constructor's names for the stack spec and the layer pattern. The pattern is
    `hybrid_layer_pattern` from 0.17 (`hybrid_override_pattern` warns there) and
    `hybrid_override_pattern` in 0.16; the spec is `hybrid_stack_spec` from 0.18 (the
    `MambaModel` wrapper maps `mamba_stack_spec`) and `mamba_stack_spec` before."""
    spec = "hybrid_stack_spec" if mcore_at_least(0, 18) else "mamba_stack_spec"
    layers = "hybrid_layer_pattern" if mcore_at_least(0, 17) else "hybrid_override_pattern"
    return {spec: stack_spec, layers: pattern}


def whole_layer_cuda_graph_scope() -> dict:
    """TransformerConfig arguments for Megatron's default CUDA graph scope (the whole layer;
    this project captures its own graphs, `cuda_graph_impl` stays "none") in the spelling
    that does not warn: the default "full" warns 'full scope is deprecated' in every
    TransformerConfig (0.16-0.19); an empty list means the same. The field is
    `cuda_graph_modules` from 0.18 (`cuda_graph_scope` is its deprecated alias there)."""
    return {"cuda_graph_modules" if mcore_at_least(0, 18) else "cuda_graph_scope": []}


def dense_mlp_submodule(linear_fc1, linear_fc2, ffn_hidden_size: int):
    """The MLP of a dense MLP layer (`TransformerLayerSubmodules.mlp`) with its width given:
    without `ffn_hidden_size` Megatron's MLP warns that it is required (0.16-0.19). From 0.18
    a layer's MLP is built by `MLP.as_mlp_submodule` (as in Megatron's own hybrid specs);
    a `ModuleSpec` of `MLP` is still accepted but rewrapped with a logged warning. Up to
    0.17 the layer builds a `ModuleSpec` and passes its params to `MLP`."""
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    submodules = MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2)
    if mcore_at_least(0, 18):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules, ffn_hidden_size=ffn_hidden_size)
    return ModuleSpec(module=MLP, params={"ffn_hidden_size": ffn_hidden_size}, submodules=submodules)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def mamba_context_parallel(cp_group, mixer):
    """Megatron-Core's `MambaContextParallel` for `mixer` (our HybridMambaMixer): it takes the
    conv1d module (`conv1d_cp1`) up to 0.18, and the conv1d weight, bias and padding
    (`conv1d_weight_cp1`, `conv1d_bias_cp1`, `conv1d_padding`) from 0.19. The tensors it
    keeps are the mixer's own parameters, so in-place loads and `.cuda()` reach it."""
    from megatron.core.ssm.mamba_context_parallel import MambaContextParallel

    if mcore_at_least(0, 19):
        conv = dict(conv1d_weight_cp1=mixer.conv1d.weight, conv1d_bias_cp1=mixer.conv1d.bias,
                    conv1d_padding=mixer.conv1d.padding[0])
    else:
        conv = dict(conv1d_cp1=mixer.conv1d)
    return MambaContextParallel(
        cp_group, mixer.d_inner_local_tp, mixer.nheads_local_tp, mixer.ngroups_local_tp, mixer.d_state,
        dt_bias_cp1=mixer.dt_bias, A_log_cp1=mixer.A_log, D_cp1=mixer.D, D_has_hdim=False, **conv,
    )


def write_common_state_file(state: dict, checkpoint_dir) -> None:
    """Write `common.pt` (the checkpoint's non-tensor state) where Megatron-Core does not.

    Up to 0.18 `dist_checkpointing.save` writes the common state to `common.pt` and
    `load_common_state_dict` reads only that file. From 0.19 it is saved inside the torch_dist
    shards (a `common_state` ShardedObject) and no common.pt is written; 0.19 still reads a
    common.pt first when there is one (serialization.py, `_legacy_common_state_exists`). So
    that every supported version reads every checkpoint this project writes, under 0.19 rank 0
    writes common.pt too, from `state` as passed to `dist_checkpointing.save` (what Megatron
    0.18 would have written: the persistent, non-sharded part). Call after the save."""
    if not mcore_at_least(0, 19):
        return
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    import os

    from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base

    _, persistent = extract_nonpersistent(state)
    _, common = extract_sharded_base(persistent)
    torch.save(common, os.path.join(str(checkpoint_dir), "common.pt"))


def _patch_router_gating_device() -> None:
    """TopKRouter.gating moves a CPU router weight to `torch.cuda.current_device()`
    (megatron/core/transformer/moe/router.py, 0.16-0.19). Without CUDA, keep it where it is."""
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
    `torch.cuda.current_device()` (transformer/moe/router.py, 0.16-0.19)."""
    from megatron.core.transformer.moe.router import TopKRouter

    TopKRouter.__init__ = _on_cpu_device(TopKRouter.__init__)


def _patch_tensor_parallel_buffers_device() -> None:
    """Sequence-parallel gathers/reduce-scatters allocate their outputs and the global
    gather buffer on `torch.cuda.current_device()` (tensor_parallel/mappings.py,
    layers.py, utils.GlobalMemoryBuffer, 0.16-0.19); TP/SP on CPU (gloo) needs them on CPU."""
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
    (e.g. the embedding, tensor_parallel/random.py, 0.16-0.19); a CPU-only torch has no CUDA
    RNG to fork, and CPU dropout draws from torch's default generator."""
    import contextlib

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker.fork = contextlib.contextmanager(lambda self, name=None: (yield))


def _patch_checkpoint_finalize_device() -> None:
    """save_state_dict_async_finalize broadcasts a failure flag allocated on
    `torch.cuda.current_device()` (dist_checkpointing/strategies/state_dict_saver.py, 0.16-0.19;
    from 0.17 the torch strategy looks it up in that module at every save)."""
    from megatron.core.dist_checkpointing.strategies import state_dict_saver, torch as torch_strategy

    wrapped = _on_cpu_device(state_dict_saver.save_state_dict_async_finalize)
    state_dict_saver.save_state_dict_async_finalize = wrapped
    torch_strategy.save_state_dict_async_finalize = wrapped


def _patch_te_general_gemm() -> None:
    """moe_utils.router_gating_linear reads the module global `te_general_gemm`, which is
    only defined when the TE import succeeded (moe_utils.py, 0.16): NameError without TE.
    Define it as None so the plain torch matmul path is taken. From 0.17 Megatron-Core
    defines it as None itself and this does nothing."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_mamba_stack_final_norm() -> None:
    """The hybrid stack builds its final norm with `TENorm` unconditionally, which raises
    ImportError without TE: in ssm/mamba_block.py (0.16, 0.17) and in
    models/hybrid/hybrid_block.py (0.18+, where mamba_block only re-exports). Use our
    RMSNorm, same parameter name."""
    if mcore_at_least(0, 18):
        from megatron.core.models.hybrid import hybrid_block as block
    else:
        from megatron.core.ssm import mamba_block as block

    from elastic_megatron.models.norms import RMSNorm

    block.TENorm = RMSNorm


def _disable_jit_fuser_compile() -> None:
    """megatron.core.jit sets `jit_fuser = torch.compile` (0.16-0.19), so small elementwise
    functions (squared_relu, bias-dropout-add, MoE score helpers) are compiled by inductor
    on their first call: ~15 s of C++ compilation per process on CPU for no gain. Run
    them eagerly when there is no GPU."""
    import torch._dynamo

    torch._dynamo.config.disable = True


def _patch_checkpoint_preload_sync() -> None:
    """FileSystemWriterAsync.preload_tensors copies tensors to host with non_blocking=True
    and then calls torch.cuda.synchronize() (dist_checkpointing/strategies/
    filesystem_async.py, 0.16-0.19), which raises without CUDA. On CPU the copy is already
    synchronous: preload with non_blocking=False."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.preload_tensors

    def preload_tensors(write_buckets, non_blocking=True):
        return original(write_buckets, non_blocking=False)

    FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)


def _patch_checkpoint_results_queue() -> None:
    """Megatron's torch_dist writer collects its workers' results through a queue served by
    a `multiprocessing.Manager` (dist_checkpointing/strategies/filesystem_async.py): a
    spawned server process that outlives a trainer killed with SIGKILL (seen: orphans of
    ~390 MB each), and that re-imports `__main__` of a script without a main guard. Our saves
    are synchronous: the trainer itself puts the results in and takes them out (right away,
    with get_nowait), so an in-process thread-safe queue is the exact fit and leaves no
    server behind. (A multiprocessing.Queue is not: its put goes through a feeder thread and
    races that get_nowait.) The queue's getter is `_get_write_results_queue()` in 0.16 and
    `get_write_results_queue(mp_mode)` from 0.17, where the writers also became threads
    instead of forked processes; in 0.16 the forked writers die with the trainer
    (checkpoint/store.py)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results = queue.Queue()
    if mcore_at_least(0, 17):
        filesystem_async.get_write_results_queue = lambda mp_mode="spawn": results
    else:
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
