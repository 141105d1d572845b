"""Nested models at inference, from one loaded elastic checkpoint, with no second copy of
the weights.

A budget's model is the sliced model (real, smaller shapes, so a smaller budget does
proportionally less compute), but its parameters are views into the parent's sorted
weights: the same re-indexing rules as slicing (elastic/reindex.py), with each kept run of
positions narrowed instead of copied (`view_or_take`). Every axis the method shrinks in
the presets (hidden, MoE and dense FFN channels, Mamba head channels, whole heads where all
groups keep the same prefix) is a prefix, hence a view; only per-group head prefixes that
leave gaps between groups are gathered into new tensors, and `ViewStats` says how many
bytes that took. The skeleton is built on the meta device, so no full-size model is
allocated on the way either.

`contiguous=True` copies every narrowed weight that is not contiguous (a prefix of the
input dimension is a strided view: each row skips the parent's remaining columns) into a
contiguous tensor of its own, for a budget where strided reads cost time; `ViewStats`
counts the bytes that costs (benchmarks/generation.py measures both).

The view model equals the hard-masked parent at that budget, which equals the sliced
checkpoint (tests/test_inference.py holds both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.reindex import expert_slots, prefix_index, reindex_rule, view_or_take
from elastic_megatron.elastic.widths import Widths, sub_model_config
from elastic_megatron.models.forward import unwrap
from elastic_megatron.models.hybrid import build_model


@dataclass
class ViewStats:
    shared_bytes: int = 0  # bytes of the budget's tensors that are views of the parent's
    copied_bytes: int = 0  # bytes gathered into new tensors (scattered positions)
    tensors: int = 0


def _storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def budget_model(parent, cfg: ModelConfig, widths: Widths, name: str = "budget",
                 contiguous: bool = False) -> tuple[nn.Module, ModelConfig, ViewStats]:
    """(model, its config, stats) of budget `widths` of `parent` (a MambaModel of `cfg` whose
    weights are in importance order), sharing the parent's weights (`contiguous`: except the
    strided ones, copied)."""
    parent = unwrap(parent)
    sub_cfg = sub_model_config(cfg, widths, name=name)
    dtype = next(parent.parameters()).dtype
    model = build_model(sub_cfg, params_dtype=dtype, meta=True)
    index = prefix_index(cfg, widths)
    slots = expert_slots(index)
    owned = {_storage_of(t) for t in parent.state_dict().values() if torch.is_tensor(t)}
    wanted = {k for k, v in model.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
    stats = ViewStats()
    for source_name, tensor in parent.state_dict(keep_vars=True).items():
        if not torch.is_tensor(tensor) or source_name.endswith("_extra_state"):
            continue
        rule = reindex_rule(cfg, index, source_name, slots, take=view_or_take)
        if rule is None:  # an expert the budget drops
            continue
        new_name, cut = rule
        view = cut(tensor.detach())
        if contiguous:
            view = view.contiguous()
        _assign(model, new_name, view)
        wanted.discard(new_name)
        stats.tensors += 1
        nbytes = view.numel() * view.element_size()
        if _storage_of(view) in owned:
            stats.shared_bytes += nbytes
        else:
            stats.copied_bytes += nbytes
    if wanted:
        raise RuntimeError(f"budget view model: no source for {sorted(wanted)[:3]} (the parent lacks tensors of its config)")
    model.eval()
    return model, sub_cfg, stats


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        if tuple(old.shape) != tuple(tensor.shape):
            raise RuntimeError(f"budget view model: {name} is {tuple(tensor.shape)}, the sliced config needs {tuple(old.shape)}")
        param = nn.Parameter(tensor, requires_grad=False)
        for key, value in vars(old).items():  # Megatron's tensor-parallel attributes
            setattr(param, key, value)
        module._parameters[attr] = param
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise RuntimeError(f"budget view model: {name} is neither a parameter nor a buffer")
