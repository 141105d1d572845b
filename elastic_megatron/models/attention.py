"""Core attention through torch's scaled_dot_product_attention.

A drop-in for Megatron-Core's `DotProductAttention` in the `local` backend: same
constructor and forward signature, same tensor layout ([s, b, heads, head_dim] in,
[s, b, heads * head_dim] out). Megatron's version allocates a buffer on
`torch.cuda.current_device()`, so it cannot run on CPU; this one runs anywhere and uses
the fused SDPA kernels on GPU. Causal, no positional embedding, grouped query attention.

Under context parallelism (parallel/context.py) each rank holds two chunks of
every sequence: it gathers the keys and values of all CP ranks (GQA keeps them small)
and attends each of its query chunks to the keys up to that chunk's end, causal by true
position (lower-right aligned), which is exactly the single-rank result.

Cached decoding does not go through this module: inference/layers.py attends over its
preallocated slot caches itself.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from elastic_megatron.parallel.context import chunk_order, gather_sequence


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.cp = config.context_parallel_size
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding):
            raise NotImplementedError(f"SDPACoreAttention: unsupported mask type {attn_mask_type}")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences and attention bias need the te backend")
        mask_type = attn_mask_type or self.attn_mask_type
        if self.cp > 1:
            if mask_type != AttnMaskType.causal or attention_mask is not None:
                raise NotImplementedError("SDPACoreAttention: context parallelism supports the causal mask only")
            return self._context_parallel(query, key, value)
        sq, b, nh, hd = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            # Megatron masks are True where attention is NOT allowed.
            mask = ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != nh,
        )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hd)

    def _context_parallel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Causal attention of this CP rank's two query chunks over the gathered keys."""
        from megatron.core import parallel_state

        sq, b, nh, hd = query.shape
        keys, values = gather_sequence(key), gather_sequence(value)  # [s, b, groups, hd], sequence order
        half = sq // 2
        outs = []
        for i, c in enumerate(chunk_order(self.cp, parallel_state.get_context_parallel_rank())):
            q = query[i * half:(i + 1) * half].permute(1, 2, 0, 3)
            end = (c + 1) * half  # the chunk sees every key up to its own last position
            k, v = (t[:end].permute(1, 2, 0, 3) for t in (keys, values))
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_lower_right(half, end),
                dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale, enable_gqa=k.shape[1] != nh,
            )
            outs.append(out.permute(2, 0, 1, 3).reshape(half, b, nh * hd))
        return torch.cat(outs, dim=0)
