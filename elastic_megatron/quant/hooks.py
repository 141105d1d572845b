"""Fake quantization of a built model's linears, on unmodified Megatron-Core modules.

`QuantHooks(model, fmt, recipe)` gives every linear the recipe quantizes a ModelOpt
`TensorQuantizer` for its weight and one for its input, and wraps that module's forward:
the input is fake-quantized after any mask pre-hook (so the elastic masks' zeros quantize
like the sliced model's missing channels) and the weight is fake-quantized whole, with
the parent's scale, whatever budget is active. Straight-through gradients reach the BF16
master weights, which the optimizer updates (quantization-aware distillation).

Why not `mtq.quantize`: it converts the modules in place, and ModelOpt's Megatron plugin
then adds quantizer state to `sharded_state_dict` (with a CUDA synchronize that fails on
CPU). Here the quantizers are not submodules: the model's state dict, its checkpoints
and their resharding stay exactly as without quantization, and the scales travel as a
small record in the checkpoint metadata (`record()` / `load()`), keyed by the module's
name in the whole model (global layer number and expert id), so any layout reads them.

Scales (per tensor, one set for every budget):
- weight amax = max |W| of the parent's whole weight (all TP shards), fixed at calibration;
- input amax = max |x| over the calibration batches run at every budget (`calibrate`);
  the routed experts of one MoE layer share one input amax (the grouped GEMM of serving
  engines takes one activation scale per layer, and ModelOpt syncs it the same way).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from elastic_megatron.quant import formats
from elastic_megatron.quant.recipes import quantized

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..+)$")
_EXPERT_GROUP = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)\d+(\..+)$")


def global_name(model, local: str) -> str:
    """A module's flat name in the whole model: pipeline stages number their layers from 0
    and expert-parallel ranks their local experts, Megatron records the global ones."""
    m = _LOCAL_LAYER.match(local)
    if m is None:
        return local
    layer = model.decoder.layers[int(m.group(1))]
    rest = m.group(2)
    e = _EXPERT.match(rest)
    if e is not None:
        rest = f"{e.group(1)}{layer.mlp.local_expert_indices[int(e.group(2))]}{e.group(3)}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def expert_group(name: str) -> str:
    """Routed experts of one layer share an input scale: their common key."""
    m = _EXPERT_GROUP.match(name)
    return f"{m.group(1)}*{m.group(2)}" if m else name


class QuantHooks:
    """The quantizers of one model (see the module docstring)."""

    def __init__(self, model, fmt: str, recipe: str):
        if fmt not in formats.FORMATS:
            raise ValueError(f"quantization format {fmt!r}; allowed: {list(formats.FORMATS)}")
        self.fmt, self.recipe = fmt, recipe
        self.modules: dict[str, torch.nn.Module] = {}  # global name -> linear
        self.weight_q: dict[str, formats.TensorQuantizer] = {}
        self.input_q: dict[str, formats.TensorQuantizer] = {}
        self._originals = []
        for local, module in model.named_modules():
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                continue
            name = global_name(model, local)
            if not quantized(name, fmt, recipe):
                continue
            device = module.weight.device
            self.modules[name] = module
            self.weight_q[name] = formats.new_quantizer(fmt, device)
            if quantized(name, fmt, recipe, "input"):
                self.input_q[name] = formats.new_quantizer(fmt, device)
            self._wrap(module, self.weight_q[name], self.input_q.get(name))
        self.calibrated = False

    @staticmethod
    def _wrap(module, wq, iq) -> None:
        original = module.forward

        def forward(input_, *args, **kwargs):
            x = iq(input_) if iq is not None else input_
            # The linear reads `self.weight`: an instance attribute shadows the parameter
            # for this call only, so the master weight itself is never overwritten.
            module.__dict__["weight"] = wq(module._parameters["weight"])
            try:
                return original(x, *args, **kwargs)
            finally:
                del module.__dict__["weight"]

        module.forward = forward

    def remove(self) -> None:
        for module in self.modules.values():
            module.__dict__.pop("forward", None)
        self.modules.clear()

    # ---- scales ------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, forward_loop: Callable[[], None]) -> None:
        """Max calibration: weight amax from the weights, input amax from `forward_loop`
        (which runs the calibration batches, at every budget for an elastic model); then
        the same scales on every rank (max over all ranks, per global name)."""
        amax = {name: {"weight": float(m.weight.detach().abs().max())} for name, m in self.modules.items()}
        for q in self.weight_q.values():
            q.disable()  # full precision while the inputs are observed, as ModelOpt's max calibration
        for q in self.input_q.values():
            formats.start_calibration(q)
        try:
            forward_loop()
        finally:
            for name, q in self.input_q.items():
                if q._calibrator.compute_amax() is not None:
                    formats.finish_calibration(q)
                    amax[name]["input"] = float(q.amax)
                q.disable_calib()
            for q in self.weight_q.values():
                q.enable()
        self.load_amax(_merge_over_ranks(amax))
        self.calibrated = True

    def load_amax(self, amax: dict[str, dict[str, float]]) -> None:
        """Set every quantizer's amax from a record keyed by global module name."""
        shared: dict[str, float] = {}
        for name, a in amax.items():
            if "input" in a:
                g = expert_group(name)
                shared[g] = max(shared.get(g, 0.0), a["input"])
        missing = [n for n in self.modules if n not in amax]
        if missing:
            raise KeyError(f"no quantization scales recorded for {missing[0]} (and {len(missing) - 1} more)")
        for name, module in self.modules.items():
            device = module.weight.device
            formats.set_amax(self.weight_q[name], amax[name]["weight"], device)
            if name in self.input_q:
                value = shared.get(expert_group(name))
                if value is None:
                    raise KeyError(f"no input scale recorded for {name}: no calibration batch reached it")
                formats.set_amax(self.input_q[name], value, device)
        self.calibrated = True

    def amax(self) -> dict[str, dict[str, float]]:
        out = {}
        for name in self.modules:
            out[name] = {"weight": float(self.weight_q[name].amax)}
            if name in self.input_q:
                out[name]["input"] = float(self.input_q[name].amax)
        return _merge_over_ranks(out)

    def record(self) -> dict:
        """What a checkpoint carries: the format, the recipe and every scale."""
        from modelopt import __version__ as modelopt_version

        return {"format": self.fmt, "recipe": self.recipe, "algorithm": "max", "modelopt": modelopt_version,
                "amax": self.amax()}

    def load(self, record: dict) -> None:
        if record.get("format") != self.fmt or record.get("recipe") != self.recipe:
            raise ValueError(f"the scales were calibrated for {record.get('format')}/{record.get('recipe')}, not {self.fmt}/{self.recipe}")
        self.load_amax(record["amax"])


def _merge_over_ranks(amax: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Max per global name and kind over every rank (TP shards, DP replicas; PP stages and
    EP ranks contribute their own names), so every rank holds the whole record."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return dict(sorted(amax.items()))
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, amax)
    merged: dict[str, dict[str, float]] = {}
    for part in parts:
        for name, kinds in part.items():
            slot = merged.setdefault(name, {})
            for kind, v in kinds.items():
                slot[kind] = max(slot.get(kind, 0.0), v)
    return dict(sorted(merged.items()))


def attach(model, record: Optional[dict], fmt: str, recipe: str) -> QuantHooks:
    """Quantizers on `model`, with the scales of `record` when given."""
    hooks = QuantHooks(model, fmt, recipe)
    if record is not None:
        hooks.load(record)
    return hooks
