"""Model FLOPs per token of the hybrid model, for MFU.

Counted per token for one forward pass, then x3 for forward + backward:
- every weight matrix a token passes through: 2 x its (active) parameters, the output
  layer included, the embedding lookup excluded;
- attention scores and values with a causal mask: 2 x 2 x (seq/2) x heads x head_dim
  per attention layer;
- the Mamba2 scan: state update and read-out, 2 x 2 x heads x head_dim x state per
  layer, plus the depthwise conv1d, 2 x conv channels x kernel.
"""

from __future__ import annotations

from elastic_megatron.config.model import ATTENTION, MAMBA, ModelConfig
from elastic_megatron.models.counter import is_active, parameter_inventory


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    matmul = sum(
        e.numel for e in parameter_inventory(cfg)
        if len(e.shape) == 2 and e.component != "embedding" and is_active(e, cfg)
    )
    attention = cfg.count(ATTENTION) * 2 * 2 * (seq_length / 2) * cfg.num_attention_heads * cfg.head_dim
    conv_channels = cfg.mamba_d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
    scan = cfg.count(MAMBA) * (2 * 2 * cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.mamba_state_dim
                               + 2 * conv_channels * cfg.mamba_conv_kernel)
    return 3.0 * (2 * matmul + attention + scan)
