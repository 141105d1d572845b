"""Test-only shims that let mamba_ssm's and ModelOpt's Triton kernels run on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1), so CI executes the GPU branch of the
Mamba mixer, the decode step and the fake quantizers without a GPU.

tests/conftest.py calls `install()` first thing when TRITON_INTERPRET=1 (the variable must
be set before any `@triton.jit` function is defined, i.e. before the kernels' modules are
imported; `make test-kernels` sets it). Nothing here is imported by the package.

What the kernels need that a CPU machine does not have, one shim each:
- `mamba_ssm/__init__.py` imports the compiled `selective_scan_cuda` (never built here):
  the package is registered by path without running its `__init__`, so the pure-Python
  Triton modules under `mamba_ssm.ops.triton` import on their own.
- The launch wrappers enter `torch.cuda.device(x.device.index)`: a no-op context for
  CPU tensors.
- Some backward wrappers size their grids from
  `torch.cuda.get_device_properties(...).multi_processor_count`: a fixed count.
- The autotuner times each candidate config on the device; there is no driver to time
  on, so each kernel keeps one config (the one with the largest blocks: fewest programs,
  which is what makes the interpreter fastest). Every config computes the same function;
  only speed differs on a GPU.
- The interpreter's own float -> fp8 conversion truncates exponents wrongly (127.99 comes
  out as 64): casts to and from the OCP fp8 formats go through torch's, saturating to the
  largest finite value as the GPU's `cvt.rn.satfinite` does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

INTERPRETER_SMS = 4  # multiprocessor count reported to grid-sizing code (any positive count is correct)


def active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _register_without_init(package: str) -> bool:
    """Put `package` in sys.modules as a bare namespace over its real directory, so its
    submodules import without executing its __init__.py. False if it is not installed."""
    if package in sys.modules:
        return True
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    module = types.ModuleType(package)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    sys.modules[package] = module
    return True


def _block_product(config) -> int:
    product = 1
    for key, value in config.kwargs.items():
        if key.startswith("BLOCK_SIZE"):
            product *= int(value)
    return product


def install() -> None:
    """Apply the shims (idempotent). Call before importing elastic_megatron or any kernel."""
    if not active():
        raise RuntimeError("tests/triton_interpreter.install() needs TRITON_INTERPRET=1 set before Python starts")
    import torch

    if getattr(torch.cuda, "_elastic_interpreter_shims", False):
        return
    if not _register_without_init("mamba_ssm"):
        raise RuntimeError("mamba_ssm is not installed: make test-kernels installs it (see the Makefile)")

    class _NoDevice(contextlib.nullcontext):
        def __init__(self, device=None):
            super().__init__()

    torch.cuda.device = _NoDevice
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        multi_processor_count=INTERPRETER_SMS, name="triton-interpreter", gcnArchName="", major=9, minor=0)

    from triton.runtime import autotuner

    unpruned = autotuner.Autotuner.prune_configs

    def one_config(self, kwargs):
        configs = unpruned(self, kwargs)
        return [max(configs, key=_block_product)]

    autotuner.Autotuner.prune_configs = one_config
    # Triton 3.7 benchmarks even a single remaining config: nothing to time, nothing to run.
    autotuner.Autotuner._bench = lambda self, *args, config, **meta: [0.0, 0.0, 0.0]
    _fp8_casts_through_torch()
    torch.cuda._elastic_interpreter_shims = True


def _fp8_casts_through_torch() -> None:
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    wide = {tl.float32: (torch.float32, torch.int32, np.uint32), tl.float16: (torch.float16, torch.int16, np.uint16),
            tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16)}
    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        # `data` holds the source values as numpy stores them (bf16 as uint16, fp8 as uint8);
        # the result is the destination's bits as an unsigned integer array.
        if dst in fp8 and src in wide:
            torch_src, bits, _ = wide[src]
            values = torch.from_numpy(np.ascontiguousarray(data).copy()).view(torch_src).float()
            limit = torch.finfo(fp8[dst]).max
            values = torch.where(values.isnan(), values, values.clamp(-limit, limit))
            return values.to(fp8[dst]).view(torch.uint8).numpy().reshape(data.shape)
        if src in fp8 and dst in wide:
            torch_dst, bits, unsigned = wide[dst]
            values = torch.from_numpy(np.ascontiguousarray(data).astype(np.uint8)).view(fp8[src]).to(torch_dst)
            return values.view(bits).numpy().view(unsigned).reshape(data.shape)
        return original(data, src, dst, rounding_mode)

    interpreter._convert_float = convert
