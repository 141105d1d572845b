"""Mamba2 mixer with Megatron-Core's parameter layout and a kernel chosen at run time.

Megatron-Core's `MambaMixer` refuses to build without mamba_ssm and allocates on
`torch.cuda.current_device()`. This mixer keeps its exact parameters (names, shapes,
tensor-parallel sharding and the dist-checkpoint split of in_proj/conv1d into z/x/B/C/dt),
so checkpoints move between the two, and runs the SSD scan with:

- the mamba_ssm Triton kernel `mamba_chunk_scan_combined` on CUDA tensors when mamba_ssm
  is importable, and
- the pure-PyTorch chunked SSD in `elastic_megatron.models.ssd` otherwise (CPU).

Data flow (per token, per TP rank):
  in_proj -> [z | x B C | dt] ; xBC -> causal depthwise conv1d -> SiLU
  (x, B, C, dt) -> SSD scan with A = -exp(A_log), dt = softplus(dt + dt_bias), D skip
  y -> GatedRMSNorm(y, z) (groups of heads) -> out_proj

`mix_cached` is the prefill of cached decoding (inference/layers.py): the conv and the
chunked scan from a zero state, returning the last conv inputs and the final SSM state. The
one-token decode step is written in inference/layers.py (pure PyTorch, or mamba_ssm's
`selective_state_update` Triton kernel on CUDA when installed).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass, replace
from typing import Union

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from elastic_megatron.models import compat
from elastic_megatron.models.norms import GatedRMSNorm
from elastic_megatron.models.ssd import ssd_chunk_scan

try:  # GPU kernels; absent on CPU-only machines.
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    HAVE_MAMBA_SSM_KERNELS = True
except Exception:  # ImportError, or a broken CUDA extension on import
    mamba_chunk_scan_combined = None
    HAVE_MAMBA_SSM_KERNELS = False


__all__ = ["HybridMambaMixer", "MambaMixerSubmodules", "HAVE_MAMBA_SSM_KERNELS", "triton_interpreter"]


def triton_interpreter() -> bool:
    """Is Triton's interpreter on (TRITON_INTERPRET=1: @triton.jit kernels run on CPU tensors)?
    It must be set before the kernels' modules are imported, so it is read from the
    environment, not switched here."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class MambaMixerSubmodules:
    """Input and output projections (same fields as Megatron's; its module imports triton)."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


def _split_factory(sh_ten: ShardedTensor, sections: list[int], names: list[str]) -> ShardedTensorFactory:
    """Store one fused tensor as named row blocks (`key.z`, `key.x`, ...), each sharded by TP
    on its own, so a checkpoint reshards to another TP size (Megatron's Mamba layout)."""
    template = sh_ten.without_data()

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = replace(template, key=key, data=t, dtype=t.dtype, replica_id=replica_id, flattened_range=flattened_range)
        parts, start = [], 0
        for size, name in zip(sections, names):
            for part in whole.narrow(0, start, size):
                part.key = f"{part.key}.{name}"
                parts.append(part)
            start += size
        return parts

    @torch.no_grad()
    def merge(loaded):
        return torch.cat(loaded)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)


class HybridMambaMixer(MegatronModule):
    """Mamba2 mixer: Megatron-Core parameter layout, Triton kernel on GPU, PyTorch on CPU."""

    def __init__(
        self,
        config,
        submodules: MambaMixerSubmodules,
        d_model: int,
        d_conv: int = 4,
        chunk_size: int = 128,
        A_init_range=(1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit=(0.0, float("inf")),
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        layer_number: Optional[int] = None,
        pg_collection=None,
        pp_layer_offset: int = 0,
        kernel: str = "auto",
        name: Optional[str] = None,  # Megatron-Core 0.18+ passes each module's dotted name; unused
    ):
        super().__init__(config)
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"HybridMambaMixer: kernel={kernel!r}; allowed: auto, torch, triton")
        assert pg_collection is not None, "pg_collection must be provided"
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.layer_number = layer_number
        self.pp_layer_offset = pp_layer_offset
        self.d_model = d_model
        self.d_conv = d_conv
        self.chunk_size = chunk_size
        self.dt_limit = tuple(dt_limit)
        # Read by models/init.py, which draws these parameters whole (model.init=layout_independent).
        self.init_ranges = {"A_init_range": tuple(A_init_range), "dt_min": dt_min, "dt_max": dt_max, "dt_init_floor": dt_init_floor}
        self.kernel = kernel
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        self.nheads = config.mamba_num_heads
        self.d_inner = self.nheads * self.headdim
        self.D_has_hdim = False  # read by Megatron's sharded_state_dict

        tp_size = self.tp_group.size()
        for what, n in (("mamba_num_heads", self.nheads), ("mamba_num_groups", self.ngroups)):
            if n % tp_size:
                raise ValueError(f"{what}={n} must be divisible by the tensor parallel size {tp_size}")
        self.nheads_local_tp = self.nheads // tp_size
        self.d_inner_local_tp = self.d_inner // tp_size
        self.ngroups_local_tp = self.ngroups // tp_size

        # [z | x | B | C | dt] in one column-parallel projection, as in Megatron.
        self.in_proj = build_module(
            submodules.in_proj,
            self.d_model,
            self.d_inner * 2 + 2 * self.ngroups * self.d_state + self.nheads,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )

        device = torch.device("cuda", torch.cuda.current_device()) if (
            torch.cuda.is_available() and not config.use_cpu_initialization
        ) else torch.device("cpu")
        # Per-rank parameters draw from the TP-aware RNG on GPU, as Megatron does.
        rng = get_cuda_rng_tracker().fork() if torch.cuda.is_available() else contextlib.nullcontext()

        conv_dim = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state
        with rng:
            self.conv1d = nn.Conv1d(
                conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                bias=conv_bias, device=device, dtype=config.params_dtype,
            )
            if config.perform_initialization:
                nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
            # dt_bias: inverse softplus of dt drawn log-uniformly in [dt_min, dt_max].
            dt = torch.exp(
                torch.rand(self.nheads_local_tp, device=device) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(config.params_dtype))
            A = torch.empty(self.nheads_local_tp, dtype=torch.float32, device=device)
            if config.perform_initialization:
                A.uniform_(*A_init_range)
            else:
                A.fill_(1.0)
            self.A_log = nn.Parameter(torch.log(A))  # kept in fp32, as in Megatron
        self.D = nn.Parameter(torch.ones(self.nheads_local_tp, device=device))  # fp32
        for p in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D):
            if p is not None:
                setattr(p, "tensor_model_parallel", True)

        self.norm = GatedRMSNorm(
            self.d_inner_local_tp,
            group_size=self.d_inner_local_tp // self.ngroups_local_tp,
            eps=norm_eps,
            device=device,
            dtype=config.params_dtype,
            tp_group=self.tp_group,
        )
        # Context parallelism: which heads, groups and parameter slices this CP rank scans
        # (Megatron-Core's helper; it slices the parameters in forward, so gradients reach
        # the whole tensors and checkpoints do not change with cp).
        cp_group = getattr(pg_collection, "cp", None)
        if cp_group is None:
            from megatron.core import parallel_state

            cp_group = parallel_state.get_context_parallel_group()
        self.cp = compat.mamba_context_parallel(cp_group, self)
        self.out_proj = build_module(
            submodules.out_proj,
            self.d_inner,
            self.d_model,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's Mamba checkpoint layout: per-head tensors and conv1d sharded on axis 0,
        in_proj split into z/x/B/C/dt and conv1d into x/B/C before TP sharding."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(own, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets,
                                                  tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            if name == "conv1d":
                out.update(make_sharded_tensors_for_checkpoint(
                    module.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.", {"weight": 0, "bias": 0},
                    sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
                ))
            else:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))
        gd = self.ngroups_local_tp * self.d_state
        out[f"{prefix}in_proj.weight"] = _split_factory(
            out[f"{prefix}in_proj.weight"],
            [self.d_inner_local_tp, self.d_inner_local_tp, gd, gd, self.nheads_local_tp], ["z", "x", "B", "C", "dt"],
        )
        for key in ("conv1d.weight", "conv1d.bias"):
            if f"{prefix}{key}" in out:
                out[f"{prefix}{key}"] = _split_factory(out[f"{prefix}{key}"], [self.d_inner_local_tp, gd, gd], ["x", "B", "C"])
        return out

    def use_triton(self, x: torch.Tensor) -> bool:
        """Which scan (and decode step) runs: `auto` takes the Triton kernels for CUDA tensors;
        `triton` demands them, on CUDA or, under Triton's interpreter (TRITON_INTERPRET=1), on
        CPU tensors: that is how CI runs the GPU branch without a GPU. `auto` never picks the
        interpreter (it runs the kernels in Python, ~100x slower than the PyTorch scan)."""
        if self.kernel == "torch":
            return False
        if self.kernel == "triton":
            if not HAVE_MAMBA_SSM_KERNELS:
                raise RuntimeError("kernel='triton' needs mamba_ssm's Triton kernels (pip install mamba-ssm triton)")
            if not (x.is_cuda or triton_interpreter()):
                raise RuntimeError("kernel='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
            return True
        return HAVE_MAMBA_SSM_KERNELS and x.is_cuda

    def forward(self, hidden_states: torch.Tensor, inference_context=None, *, inference_params=None, packed_seq_params=None):
        """hidden_states: [seq, batch, hidden] -> (out, bias) with out [seq, batch, hidden]."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("HybridMambaMixer: cached inference is not supported yet")
        if packed_seq_params is not None:
            raise NotImplementedError("HybridMambaMixer: packed sequences are not supported yet")
        zxbcdt, _ = self.in_proj(hidden_states)
        y = self.mix(zxbcdt.transpose(0, 1))
        return self.out_proj(y.transpose(0, 1))

    def mix(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        """[batch, seq, in_proj_out] -> gated, normalised SSD output [batch, seq, d_inner_local].

        Under context parallelism the rank holds part of the sequence: x, B, C and dt go
        to head parallelism (all-to-all over CP: the whole sequence, 1/cp of the heads),
        through the convolution and the scan, and back; z and the gated norm stay local."""
        z, xbc, dt = self._split(zxbcdt)
        if self.cp.cp_size == 1:
            y = self._conv_scan(xbc, dt, self.conv1d, self.A_log, self.D, self.dt_bias,
                                self.nheads_local_tp, self.ngroups_local_tp)
            return self.norm(y.flatten(-2), z)
        cp = self.cp
        heads = cp.pre_conv_ssm(zxbcdt.transpose(0, 1)).transpose(0, 1)  # [b, s, z|x|B|C|dt of this rank's heads]
        _, xbc, dt = torch.split(heads, [cp.d_inner_local_tpcp, cp.d_inner_local_tpcp + 2 * cp.ngroups_local_tpcp * self.d_state,
                                         cp.nheads_local_tpcp], dim=-1)
        y = self._conv_scan(xbc, dt, cp.conv1d, cp.get_A_log(), cp.get_D(), cp.get_dt_bias(),
                            cp.nheads_local_tpcp, cp.ngroups_local_tpcp)
        y = cp.post_conv_ssm(y.flatten(-2).transpose(0, 1)).transpose(0, 1)  # [b, s / cp, d_inner_local]
        return self.norm(y, z)

    def _conv_scan(self, xbc, dt, conv, A_log, D, dt_bias, nheads: int, ngroups: int) -> torch.Tensor:
        """Causal depthwise conv + SiLU, then the SSD scan: [b, s, heads, head_dim]."""
        seqlen = xbc.shape[1]
        # Causal depthwise conv over time: pad both sides, keep the first seqlen outputs.
        xbc = F.silu(conv(xbc.transpose(1, 2))[..., :seqlen].transpose(1, 2))
        x, B, C = self._split_xbc(xbc, nheads, ngroups)
        A = -torch.exp(A_log.float())
        scan = mamba_chunk_scan_combined if self.use_triton(x) else ssd_chunk_scan
        return scan(
            x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), self.chunk_size,
            D=D, z=None, dt_bias=dt_bias.float(), dt_softplus=True, dt_limit=self.dt_limit,
        )

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(
            zxbcdt,
            [self.d_inner_local_tp, self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state, self.nheads_local_tp],
            dim=-1,
        )

    def _split_xbc(self, xbc: torch.Tensor, nheads: Optional[int] = None, ngroups: Optional[int] = None):
        """x [.., heads, head_dim], B and C [.., groups, state] of this rank's heads (its TP
        shard, or `nheads`/`ngroups` of them under context parallelism)."""
        nheads = self.nheads_local_tp if nheads is None else nheads
        ngroups = self.ngroups_local_tp if ngroups is None else ngroups
        gd = ngroups * self.d_state
        x, B, C = torch.split(xbc, [nheads * self.headdim, gd, gd], dim=-1)
        return (x.unflatten(-1, (nheads, self.headdim)), B.unflatten(-1, (ngroups, self.d_state)),
                C.unflatten(-1, (ngroups, self.d_state)))

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        """softplus(dt + dt_bias), limited to dt_limit, in fp32 (as the scan computes it)."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.dt_limit
        return dt if (lo, hi) == (0.0, float("inf")) else dt.clamp(lo, hi)

    def mix_cached(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`mix` of a prompt [b, length, ...] for decoding (inference/layers.py's prefill), from
        a zero state: the output [b, length, d_inner], the last conv_kernel - 1 conv inputs
        [b, conv_dim, kernel - 1] and the final SSM state [b, heads, head_dim, state] (fp32),
        which the one-token steps continue."""
        batch, seqlen, _ = zxbcdt.shape
        z, xbc, dt = self._split(zxbcdt)
        k = self.conv1d.weight.shape[-1]
        window = torch.cat([xbc.new_zeros(batch, xbc.shape[-1], k - 1), xbc.transpose(1, 2)], dim=-1)
        conv_tail = window[..., -(k - 1):].clone()
        conv = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=window.shape[1])
        x, B, C = self._split_xbc(F.silu(conv.transpose(1, 2)))
        A = -torch.exp(self.A_log.float())
        scan = mamba_chunk_scan_combined if self.use_triton(x) else ssd_chunk_scan
        y, ssm = scan(
            x.contiguous(), self._dt(dt).contiguous(), A, B.contiguous(), C.contiguous(), self.chunk_size, D=self.D,
            return_final_states=True,
        )
        return self.norm(y.flatten(-2), z), conv_tail, ssm.float()

