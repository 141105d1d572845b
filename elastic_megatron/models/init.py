"""Fresh weights that do not depend on the parallel layout (`model.init=layout_independent`).

Megatron initialises each rank's shard from that rank's RNG stream: the CPU path draws
full weights from one stream whose position depends on which layers a pipeline stage
builds, the GPU path draws every shard from its tensor-parallel rank's tracker, the
Mamba mixer draws its conv1d, dt_bias and A_log at their local (per-TP-rank) sizes,
expert-parallel ranks build their local experts from the same stream, and the fused Mamba
in_proj ([z|x|B|C|dt]) is split per component, not in contiguous rows. So the same seed
gives other weights under TP=2, PP=2 or EP=2 than in one process.

Here every weight is drawn whole, as Megatron's CPU initialisation draws a master
weight, from a generator seeded by the run's seed and the weight's checkpoint key (one
expert at a time for expert weights), with the distribution Megatron gives it, and each
rank keeps its shard as the checkpoint layout defines it (`sharded_state_dict`: the same
map that lets a checkpoint load under any layout). A fresh model therefore gathers to the
same weights under every layout, and the run's RNG continues after the build as if
nothing had been drawn, on every rank alike. The cost is one draw of each weight's
global tensor per rank that holds a shard of it (TP x the local weights), on the
parameters' own device.

`model.init=megatron` keeps Megatron's own per-rank initialisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable, Iterator

import torch
from torch import nn

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

# The mixer's initialisation ranges (Mamba2's and Megatron's defaults), unless the mixer
# records its own (`init_ranges`).
MAMBA_INIT = {"A_init_range": (1.0, 16.0), "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4}


class LayoutIndependentInit:
    """Use around and after the construction of a model under Megatron config `config`:

        init = LayoutIndependentInit(config)
        with init.construction():
            model = ...            # Megatron's own initialisation runs, then is overwritten
        init.apply(model)
    """

    def __init__(self, config):
        self.config = config
        self.seed: int | None = None

    @contextlib.contextmanager
    def construction(self) -> Iterator[None]:
        """One draw of the run's CPU RNG (the same on every rank: all are seeded alike)
        seeds the weights; whatever Megatron's per-rank initialisation draws inside is
        forgotten afterwards, so the stream continues alike on every rank and layout."""
        self.seed = int(torch.randint(0, 2**62, ()).item())
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            yield

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Overwrite every parameter of `model` (this rank's part) with its shard of the
        layout-free weights."""
        if self.seed is None:
            raise RuntimeError("LayoutIndependentInit.apply before construction()")
        mixers = {id(p): m for m in model.modules() if hasattr(m, "A_log") for p in m.parameters()}  # Mamba mixers
        written: set[int] = set()
        for entry in model.sharded_state_dict().values():
            if isinstance(entry, ShardedTensorFactory):
                if not isinstance(entry.data, nn.Parameter):
                    continue
                pieces = entry.build()
                pieces = list(pieces.values()) if isinstance(pieces, dict) else list(pieces)
                for piece in pieces:
                    if piece.data.untyped_storage().data_ptr() != entry.data.untyped_storage().data_ptr():
                        raise RuntimeError(f"{piece.key}: the checkpoint layout's piece is a copy, not a view of the "
                                           "parameter; layout-independent initialisation cannot write it")
                    self._fill(piece, entry.key, mixers.get(id(entry.data)))
                if sum(p.data.numel() for p in pieces) != entry.data.numel():
                    raise RuntimeError(f"{entry.key}: the checkpoint layout's pieces do not cover the parameter")
                written.add(id(entry.data))
            elif isinstance(entry, ShardedTensor) and isinstance(entry.data, nn.Parameter):
                self._fill(entry, entry.key, mixers.get(id(entry.data)))
                written.add(id(entry.data))
        missing = [name for name, p in model.named_parameters() if id(p) not in written]
        if missing:
            raise RuntimeError(f"layout-independent initialisation: parameters outside the checkpoint layout: {missing}")

    def _fill(self, piece: ShardedTensor, rule_key: str, mixer) -> None:
        """Draw the whole tensor of `piece` (one expert's, for expert weights) and copy
        this rank's slice of it into `piece.data`."""
        if piece.flattened_range is not None:
            raise RuntimeError(f"{piece.key}: a flattened shard; only model parameters are initialised")
        lead = piece.prepend_axis_num
        whole = piece.global_shape[lead:]
        init = self._initializer(rule_key, mixer)
        seed = _derived_seed(self.seed, piece.key, piece.global_offset[:lead])
        device = piece.data.device
        # Megatron's init methods draw from the default generator of the tensor's device:
        # seed that one alone for this weight, and put it back afterwards.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if device.type == "cuda":
                torch.cuda.default_generators[device.index].manual_seed(seed)
            else:
                torch.default_generator.manual_seed(seed)
            full = torch.empty(whole, dtype=torch.float32, device=device)
            init(full)
        index = tuple(slice(o, o + n) for o, n in zip(piece.global_offset[lead:], piece.local_shape))
        piece.data.copy_(full[index])

    def _initializer(self, key: str, mixer) -> Callable[[torch.Tensor], None]:
        """How Megatron (and the Mamba mixer) initialise the weight of checkpoint key `key`."""
        config = self.config
        ranges = {**MAMBA_INIT, **(getattr(mixer, "init_ranges", None) or {})}
        name = key.rsplit(".", 1)[-1]
        if name == "A_log":
            low, high = ranges["A_init_range"]
            return lambda t: t.copy_(torch.empty_like(t).uniform_(low, high).log())
        if name == "dt_bias":
            return lambda t: t.copy_(_dt_bias(t, ranges["dt_min"], ranges["dt_max"], ranges["dt_init_floor"]))
        if name == "D" or key.endswith(("norm.weight", "layer_norm_weight")):
            return nn.init.ones_
        if ".conv1d." in key:  # torch's Conv1d default, weight and bias: U(+-1/sqrt(fan_in)), depthwise: fan_in = d_conv
            bound = 1 / math.sqrt(mixer.d_conv)
            return lambda t: t.uniform_(-bound, bound)
        if key.endswith("word_embeddings.weight"):
            return getattr(config, "embedding_init_method", None) or config.init_method
        if key.endswith(("linear_proj.weight", "linear_fc2.weight", "out_proj.weight")):
            return config.output_layer_init_method
        if key.endswith(("linear_qkv.weight", "linear_fc1.weight", "in_proj.weight", "router.weight",
                         "output_layer.weight")):
            return config.init_method
        raise RuntimeError(f"layout-independent initialisation has no rule for the weight {key!r}; add one to "
                           "elastic_megatron/models/init.py (or use model.init=megatron)")


def _dt_bias(t: torch.Tensor, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Inverse softplus of a step size drawn log-uniformly in [dt_min, dt_max] (Mamba2)."""
    dt = torch.exp(torch.rand_like(t) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def _derived_seed(seed: int, key: str, lead: tuple) -> int:
    """A 63-bit seed of (run seed, checkpoint key, expert index): the same on every rank."""
    text = f"{seed}:{key}:{','.join(map(str, lead))}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
