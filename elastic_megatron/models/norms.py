"""RMSNorm modules for the `local` backend (CPU and GPUs without Transformer Engine).

`RMSNorm` has the constructor of Megatron-Core's norm builders (config, hidden_size, eps),
so a ModuleSpec can put it wherever Megatron would put `TENorm` or `WrappedTorchNorm`;
unlike `WrappedTorchNorm` it supports sequence parallelism. `GatedRMSNorm` is Mamba2's
group-wise norm of `y * silu(z)` (norm after gate, as in Nemotron-H).

Both compute in fp32 and keep `weight` as the only parameter, named as in Megatron.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def _param_device(config) -> torch.device:
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, in fp32."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learnable scale."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=_param_device(config), dtype=config.params_dtype))
        # Replicated across TP ranks but sees only this rank's sequence shard under SP:
        # Megatron all-reduces the gradients of parameters marked like this.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's gated norm: RMSNorm(y * silu(z)) within groups of `group_size` channels.

    The weight is sharded along channels under tensor parallelism (each rank holds whole
    groups), like Megatron's ExtendedRMSNorm.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float, device=None, dtype=None, tp_group=None):
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"GatedRMSNorm: hidden_size={hidden_size} is not a multiple of group_size={group_size}")
        self.eps = eps
        self.group_size = group_size
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        setattr(self.weight, "tensor_model_parallel", True)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        grouped = gated.unflatten(-1, (-1, self.group_size))
        normed = rms_normalize(grouped, self.eps).flatten(-2)
        return (normed * self.weight.float()).to(y.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The weight is split along axis 0 across tensor-parallel ranks."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )
