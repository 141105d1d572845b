"""ModuleSpecs of the hybrid stack for the two backends.

The model code is Megatron-Core's (HybridModel/HybridStack, called MambaModel/MambaStack
before 0.18; MambaLayer, TransformerLayer, SelfAttention, MLP, MoELayer); only the leaves
change with the backend:

| leaf              | local (CPU, GPU without TE)       | te (Transformer Engine)            |
|-------------------|-----------------------------------|------------------------------------|
| linears           | Column/RowParallelLinear           | TE linears, norm fused into fc1/qkv |
| norms             | our RMSNorm (fp32, SP-aware)      | fused in TELayerNormColumnParallel |
| core attention    | torch SDPA                        | TEDotProductAttention              |
| experts           | SequentialMLP                     | TEGroupedMLP                       |
| Mamba mixer       | HybridMambaMixer (Triton on GPU, PyTorch SSD on CPU)           |

The local specs map their separate norm keys onto TE's fused names in the distributed
checkpoint (`sharded_state_dict_keys_map`), so a checkpoint saved with one backend loads
with the other, and with Megatron-LM.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules

from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from elastic_megatron.config.model import ModelConfig
from elastic_megatron.models import compat
from elastic_megatron.models.attention import SDPACoreAttention
from elastic_megatron.models.mamba_mixer import HybridMambaMixer, MambaMixerSubmodules
from elastic_megatron.models.norms import RMSNorm


class CpuSafeLocalSpecProvider(LocalSpecProvider):
    """Megatron's local provider with CPU-safe core attention and an SP-aware RMSNorm."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return SDPACoreAttention


def _mixer_spec(cfg: ModelConfig, in_proj, out_proj) -> ModuleSpec:
    return ModuleSpec(
        module=HybridMambaMixer,
        params={"d_conv": cfg.mamba_conv_kernel, "chunk_size": cfg.mamba_chunk_size, "norm_eps": cfg.norm_eps,
                "dt_limit": (float(cfg.mamba_dt_min), float("inf"))},
        submodules=MambaMixerSubmodules(in_proj=in_proj, out_proj=out_proj),
    )


def _local_stack_spec(cfg: ModelConfig) -> ModuleSpec:
    backend = CpuSafeLocalSpecProvider()
    column, row, norm = backend.column_parallel_linear(), backend.row_parallel_linear(), backend.layer_norm(rms_norm=True)
    moe = get_moe_module_spec_for_backend(backend, num_experts=max(cfg.moe_num_experts, 1), moe_grouped_gemm=False)
    stack, stack_submodules = compat.hybrid_stack_classes()
    return ModuleSpec(
        module=stack,
        submodules=stack_submodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=norm,
                    mixer=_mixer_spec(cfg, column, row),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=column,
                            core_attention=backend.core_attention(),
                            linear_proj=row,
                            q_layernorm=IdentityOp,
                            k_layernorm=IdentityOp,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=compat.dense_mlp_submodule(column, row, cfg.ffn_hidden_size),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=moe, mlp_bda=get_bias_dropout_add),
            ),
        ),
    )


def _te_stack_spec(cfg: ModelConfig) -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    moe = get_moe_module_spec_for_backend(TESpecProvider(), num_experts=max(cfg.moe_num_experts, 1), moe_grouped_gemm=True)
    stack, stack_submodules = compat.hybrid_stack_classes()
    return ModuleSpec(
        module=stack,
        submodules=stack_submodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    mixer=_mixer_spec(cfg, TELayerNormColumnParallelLinear, TERowParallelLinear),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=TELayerNormColumnParallelLinear,
                            core_attention=TEDotProductAttention,
                            linear_proj=TERowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    mlp=compat.dense_mlp_submodule(TELayerNormColumnParallelLinear, TERowParallelLinear, cfg.ffn_hidden_size),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(pre_mlp_layernorm=TENorm, mlp=moe, mlp_bda=get_bias_dropout_add),
            ),
        ),
    )


def hybrid_stack_spec(cfg: ModelConfig) -> ModuleSpec:
    """The hybrid stack spec for `cfg.backend`."""
    if cfg.backend == "te":
        return _te_stack_spec(cfg)
    return _local_stack_spec(cfg)
