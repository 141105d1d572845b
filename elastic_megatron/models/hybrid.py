"""Build the hybrid Mamba-Transformer-MoE model (Megatron-Core's `HybridModel`, called
`MambaModel` before 0.18) from a ModelConfig.

`to_transformer_config` is the single translation from our schema to Megatron's
TransformerConfig; `build_model` validates, applies the CPU/no-TE compat patches and
builds Megatron's hybrid model with the spec of the chosen backend (the class and its
argument names come from `compat`, which knows the installed Megatron-Core).
"""

from __future__ import annotations

import contextlib

import torch

from megatron.core.activations import squared_relu
from megatron.core.transformer.transformer_config import TransformerConfig

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig, validate_model_config
from elastic_megatron.config.parallel import ParallelConfig, expert_tensor_parallel, validate_parallel_layout
from elastic_megatron.models import compat
from elastic_megatron.models.init import LayoutIndependentInit
from elastic_megatron.models.specs import hybrid_stack_spec

_ACTIVATIONS = {
    "squared_relu": squared_relu,
    "relu": torch.nn.functional.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


def resolve_token_dispatcher(cfg: ModelConfig) -> str:
    """alltoall creates CUDA streams at construction, so CPU runs use allgather."""
    if cfg.moe_token_dispatcher != "auto":
        return cfg.moe_token_dispatcher
    return "alltoall" if torch.cuda.is_available() else "allgather"


def to_transformer_config(
    cfg: ModelConfig,
    params_dtype: torch.dtype = torch.float32,
    parallel=None,
    **overrides,
) -> TransformerConfig:
    """Megatron TransformerConfig for `cfg` under `parallel` (nothing elastic goes in here)."""
    layout = parallel if parallel is not None else ParallelConfig()
    stages = validate_parallel_layout(cfg, layout)
    has_moe = cfg.count("E") > 0
    has_attention = cfg.count("*") > 0
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        # Megatron requires attention fields even without attention layers.
        num_attention_heads=cfg.num_attention_heads if has_attention else 1,
        num_query_groups=cfg.num_query_groups if has_attention else 1,
        kv_channels=cfg.head_dim if has_attention else cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_state_dim=cfg.mamba_state_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        activation_func=_ACTIVATIONS[cfg.activation],
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        init_method_std=cfg.init_method_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        pipeline_dtype=params_dtype,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=expert_tensor_parallel(layout),
        sequence_parallel=layout.sequence_parallel,
        context_parallel_size=layout.cp,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_mamba_mem_eff_path=False,
        **compat.whole_layer_cuda_graph_scope(),
    )
    if layout.pp > 1 and len({len(st) for st in stages}) > 1:
        kwargs.update(num_layers_in_first_pipeline_stage=len(stages[0]), num_layers_in_last_pipeline_stage=len(stages[-1]))
    if has_moe:
        kwargs.update(
            num_moe_experts=cfg.moe_num_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_ffn_hidden_size or None,
            moe_router_score_function=cfg.moe_router_score_function,
            moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
            moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type=resolve_token_dispatcher(cfg),
            moe_grouped_gemm=cfg.backend == "te",
            moe_permute_fusion=False,
            moe_router_fusion=False,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(
    cfg: ModelConfig,
    params_dtype: torch.dtype = torch.float32,
    parallel=None,
    meta: bool = False,
) -> torch.nn.Module:
    """Validate `cfg` and build this rank's part of Megatron's hybrid model under the
    layout `parallel` (a ParallelConfig, the `parallel` recipe group; default: one rank).

    Megatron's parallel state must be initialised with the same layout (see
    `elastic_megatron.parallel`); a pipeline stage builds only its layers, the embedding
    on the first stage and the output layer on the last.

    `meta=True` builds on the meta device (the large tensors take no memory; a few small
    ones that the mixer places explicitly stay on the CPU): a skeleton whose parameters
    the caller replaces, e.g. with views of another model's weights (inference budgets).
    """
    from megatron.core import parallel_state

    validate_model_config(cfg)
    layout = parallel if parallel is not None else ParallelConfig()
    validate_parallel_layout(cfg, layout)
    if cfg.backend == "te" and not compat.have_transformer_engine():
        raise ConfigError("model.backend", "te", "Transformer Engine is not installed here; use model.backend=local")
    compat.check_mcore_version()
    compat.apply()
    # A meta skeleton has no values to initialise; skipping Megatron's init functions makes
    # the 30B dry run's builds several times faster.
    tcfg = to_transformer_config(cfg, params_dtype, layout, **({"perform_initialization": False} if meta else {}))
    fresh = LayoutIndependentInit(tcfg) if cfg.init == "layout_independent" and not meta else None
    with torch.device("meta") if meta else fresh.construction() if fresh else contextlib.nullcontext():
        model = _mamba_model(cfg, tcfg, parallel_state)
    if fresh:
        fresh.apply(model)  # the same weights under every layout (models/init.py)
    _mark_expert_params(model)
    if torch.cuda.is_available() and not meta:
        model.cuda(torch.cuda.current_device())
    return model


def _mamba_model(cfg: ModelConfig, tcfg, parallel_state):
    from megatron.core.process_groups_config import ProcessGroupCollection

    return compat.hybrid_model_class()(
        config=tcfg,
        # The initialised parallel state's groups, passed explicitly as Megatron-LM's training
        # passes them to its model providers (left out, the model looks up the same groups).
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        **compat.hybrid_model_kwargs(hybrid_stack_spec(cfg), cfg.hybrid_pattern),
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        parallel_output=True,
    )


def _mark_expert_params(model) -> None:
    """Routed-expert weights are reduced over the expert-data-parallel group. Megatron
    marks them (`allreduce=False`) only when EP > 1; with EP = 1 but expert TP below TP,
    the TP ranks hold expert replicas fed different sequence-parallel tokens, and their
    gradients must still be summed over expert-DP, so mark them in every layout."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for module in model.modules():
        if isinstance(module, MoELayer):
            for p in module.experts.parameters():
                p.allreduce = False
