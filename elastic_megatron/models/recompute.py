"""Activation recomputation for the hybrid stack (`trainer.recompute`).

Megatron-Core 0.16's MambaStack has no recompute of its own, and Megatron's
`tensor_parallel.checkpoint` is reentrant: gradients reach only the checkpointed
function's inputs, while the elastic masks are tensors computed from the router outside
every layer (their gradient must reach the router). So this module uses torch's
non-reentrant checkpoint, which keeps the autograd graph to such tensors, and restores
around the recomputation what the forward saw:

- the CPU and CUDA RNG states (torch's `preserve_rng_state`), and Megatron's CUDA RNG
  tracker states (the TP-aware streams), as Megatron's checkpoint does;
- every registered piece of forward state (`register_state`): the elastic hooks register
  their current masks, which the step resets to None after its forward, long before
  backward recomputes the layer.

Granularity, as Megatron-LM's --recompute-granularity/-method/-num-layers/-modules:

- `full`: whole hybrid layers (Mamba, attention, MoE, MLP) keep only their input;
  `uniform` checkpoints every group of `num_layers` consecutive layers of the stage,
  `block` the first `num_layers` layers of the stage, one by one.
- `selective`: only the named parts, each keeping its inputs: `core_attn` (attention
  core), `mamba_scan` (conv + SSD scan + gated norm of the Mamba mixer; under context
  parallelism its all-to-alls too), `moe` (the routed experts' fc1/activation/fc2) and
  `mlp` (dense MLPs and the shared expert).

Only the training forward is affected: evaluation, no-grad passes and decoding run the
modules' own forward.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer

_MEASURING: list = []  # active SavedActivations, told what checkpoints keep


class SavedActivations:
    """Peak bytes of the tensors autograd keeps for backward while the block runs
    (parameters and their views excluded, each storage counted once while any saved
    tensor holds it): what activation memory is, measured exactly on any device. With
    activation recomputation, what a checkpoint keeps (its inputs) is counted, its inner
    tensors are not (they are recomputed).

        with SavedActivations(model) as saved:
            loss = step(...)
        saved.bytes
    """

    def __init__(self, *modules: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage address -> bytes, while a saved tensor holds it
        self._holders: dict[int, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # A new tensor object for the graph to hold: returning `t` itself would make a
        # reference cycle the garbage collector cannot see (graphs never backpropagated
        # would stay alive), and its lifetime tells when autograd lets go of it.
        saved = t.detach()
        self.keep(saved)
        return saved

    def keep(self, t: torch.Tensor) -> None:
        """Count `t`'s storage while `t` is alive."""
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.params:
            return
        if ptr not in self._holders:
            self._holders[ptr] = 0
            self._sizes[ptr] = storage.nbytes()
            self.live += self._sizes[ptr]
            self.peak = max(self.peak, self.live)
        self._holders[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        self._holders[ptr] -= 1
        if not self._holders[ptr]:
            del self._holders[ptr]
            self.live -= self._sizes.pop(ptr)

    def __enter__(self) -> "SavedActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        _MEASURING.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _MEASURING.remove(self)
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        """The peak (reached at the end of the forward pass when backward follows)."""
        return self.peak


def _states(model) -> list:
    """The (object, attribute) pairs whose values a recomputation must see again."""
    return model.__dict__.setdefault("_recompute_states", [])


def register_state(model, holder, attribute: str) -> None:
    """`holder.attribute` is forward state of `model` (e.g. the elastic masks): its value
    at forward time is put back while a checkpointed part is recomputed."""
    _states(model).append((holder, attribute))


@contextlib.contextmanager
def _restored(states: list, values: list, tracker_states):
    saved = [getattr(h, a) for h, a in states]
    saved_tracker = None
    if tracker_states is not None:
        saved_tracker = get_cuda_rng_tracker().get_states()
        get_cuda_rng_tracker().set_states(tracker_states)
    for (h, a), v in zip(states, values):
        setattr(h, a, v)
    try:
        yield
    finally:
        for (h, a), v in zip(states, saved):
            setattr(h, a, v)
        if saved_tracker is not None:
            get_cuda_rng_tracker().set_states(saved_tracker)


def checkpointed(fn: Callable, states: list) -> Callable:
    """`fn` whose activations are recomputed in backward (non-reentrant checkpoint), with
    the forward-time values of `states` and RNG tracker restored around the recompute."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        values = [getattr(h, a) for h, a in states]
        for measure in _MEASURING:  # the checkpoint keeps its inputs alive until backward
            for t in (*args, *kwargs.values()):
                if torch.is_tensor(t):
                    measure.keep(t)
        tracker = get_cuda_rng_tracker().get_states() if torch.cuda.is_available() else None

        def context_fn():
            return contextlib.nullcontext(), _restored(states, values, tracker)

        return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return run


def _run_layers(layers: Sequence[torch.nn.Module], hidden_states: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        out = layer(hidden_states=hidden_states, attention_mask=None)
        hidden_states = out[0] if isinstance(out, tuple) else out
    return hidden_states


def _layer_groups(n: int, method: str, num_layers: int) -> list[tuple[range, bool]]:
    """(layer indices, checkpointed) of a stage of n layers."""
    if method == "uniform":
        return [(range(i, min(i + num_layers, n)), True) for i in range(0, n, num_layers)]
    return [(range(i, i + 1), i < num_layers) for i in range(n)]


def _full_stack_forward(decoder, states: list, method: str, num_layers: int):
    """A MambaStack.forward that checkpoints groups of layers while training."""
    original = decoder.forward

    def forward(hidden_states, attention_mask=None, inference_context=None, rotary_pos_emb=None, **kwargs):
        if inference_context is not None or kwargs.get("inference_params") is not None or not torch.is_grad_enabled():
            return original(hidden_states, attention_mask, inference_context, rotary_pos_emb, **kwargs)
        if kwargs.get("packed_seq_params") is not None:
            raise NotImplementedError("activation recompute: packed sequences are not supported")
        if not decoder.pre_process:
            hidden_states = decoder.input_tensor
        if hasattr(hidden_states, "unwrap"):  # Megatron's WrappedTensor
            hidden_states = hidden_states.unwrap()
        layers = list(decoder.layers)
        for group, ckpt in _layer_groups(len(layers), method, num_layers):
            run = functools.partial(_run_layers, [layers[i] for i in group])
            hidden_states = checkpointed(run, states)(hidden_states) if ckpt else run(hidden_states)
        if decoder.post_process and decoder.post_layer_norm:
            hidden_states = decoder.final_norm(hidden_states)
        return hidden_states

    return forward


def _wrap(obj, name: str, states: list) -> None:
    setattr(obj, name, checkpointed(getattr(obj, name), states))


def apply_recompute(model, granularity: str, method: str = "uniform", num_layers: int = 1,
                    modules: Sequence[str] = ("mamba_scan", "moe")) -> None:
    """Turn on recomputation in this rank's `model` (a MambaModel; call once, before
    training). Values were validated with the job (config/schema.py)."""
    if granularity == "none":
        return
    decoder = model.decoder
    states = _states(model)
    if granularity == "full":
        decoder.forward = _full_stack_forward(decoder, states, method, num_layers)
        return
    for layer in decoder.layers:
        if isinstance(layer, MambaLayer) and "mamba_scan" in modules:
            _wrap(layer.mixer, "mix", states)
        elif isinstance(layer, TransformerLayer):
            attention = getattr(layer, "self_attention", None)
            if "core_attn" in modules and attention is not None and not isinstance(attention, IdentityOp):
                _wrap(attention.core_attention, "forward", states)
            mlp = layer.mlp
            if isinstance(mlp, MoELayer):
                if "moe" in modules:
                    _wrap(mlp.experts, "forward", states)
                if "mlp" in modules and getattr(mlp, "shared_experts", None) is not None:
                    _wrap(mlp.shared_experts, "forward", states)
            elif isinstance(mlp, MLP) and "mlp" in modules:
                _wrap(mlp, "forward", states)
