"""Model architecture schema: one dataclass for the hybrid Mamba-Transformer-MoE family.

The YAML presets in `recipes/model/` are instances of `ModelConfig`. `validate_model_config`
checks every field before anything is built; `to_transformer_config` is the single place
where our schema becomes a Megatron-Core `TransformerConfig` (elastic settings never go
there: they live in the elastic spec).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from elastic_megatron.config.errors import ConfigError, require_choice, require_positive_int

# Layer symbols of Megatron-Core's hybrid pattern (megatron.core.ssm.mamba_hybrid_layer_allocation).
MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_SYMBOLS = {MAMBA: "Mamba2 mixer", ATTENTION: "self-attention", MLP: "dense MLP", MOE: "MoE"}

BACKENDS = ("local", "te")
ACTIVATIONS = ("squared_relu", "relu", "gelu", "silu")
ROUTER_SCORE_FUNCTIONS = ("sigmoid", "softmax")
TOKEN_DISPATCHERS = ("auto", "allgather", "alltoall")
# How a fresh model's weights are drawn (models/init.py): layout_independent gives the same
# weights under every parallel layout; megatron is Megatron's own per-rank initialisation.
INITS = ("layout_independent", "megatron")


@dataclass
class ModelConfig:
    """Architecture of a hybrid model. Widths of unused layer types are ignored."""

    # The preset's name (recipes/model/<name>.yaml), recorded in checkpoints.
    name: str = "custom"
    # One symbol per layer: M Mamba2, * attention, - dense MLP, E MoE.
    hybrid_pattern: str = "M*-E"
    # Model width (d_model).
    hidden_size: int = 64
    # Vocabulary size of the embedding and output layer.
    vocab_size: int = 256
    # Longest sequence the model is built for (no positional embedding: only a bound).
    max_sequence_length: int = 4096

    # Attention: grouped query attention, no positional embedding.
    num_attention_heads: int = 4
    # Key/value head groups of grouped query attention.
    num_query_groups: int = 2
    # Channels per attention head; None means hidden_size // num_attention_heads.
    kv_channels: Optional[int] = None

    # Mamba2 mixer.
    mamba_num_heads: int = 8
    # Channels per Mamba2 head.
    mamba_head_dim: int = 16
    # SSM state size per head (d_state).
    mamba_state_dim: int = 16
    # Groups of the B and C projections (n_groups).
    mamba_num_groups: int = 2
    # Width of the causal depthwise convolution.
    mamba_conv_kernel: int = 4
    # Chunk length of the chunked SSD scan.
    mamba_chunk_size: int = 128
    # Lower clamp of the Mamba step size dt after softplus; 0 = no clamp (Megatron's and
    # mamba_ssm's default). transformers' Nemotron-H clamps at its time_step_min, so HF
    # imports set it to keep the imported model's function.
    mamba_dt_min: float = 0.0

    # Dense MLP ('-' layers).
    ffn_hidden_size: int = 128

    # MoE ('E' layers), as in Nemotron 3 Nano: sigmoid scores, expert bias, scaled top-k.
    moe_num_experts: int = 4
    # Experts each token is routed to.
    moe_router_topk: int = 2
    # FFN width of one routed expert.
    moe_ffn_hidden_size: int = 64
    # 0 disables the shared expert.
    moe_shared_expert_ffn_hidden_size: int = 64
    # sigmoid | softmax scores of the MoE router.
    moe_router_score_function: str = "sigmoid"
    # Aux-loss-free load balancing: a per-expert bias added to the scores for routing.
    moe_router_enable_expert_bias: bool = True
    # Scale of the top-k routing weights; null = none.
    moe_router_topk_scaling_factor: Optional[float] = 2.5
    # auto: allgather on CPU (alltoall creates CUDA streams), alltoall on GPU.
    moe_token_dispatcher: str = "auto"

    # MLP and expert activation: squared_relu | relu | gelu | silu.
    activation: str = "squared_relu"
    # Epsilon of the RMSNorms.
    norm_eps: float = 1e-5
    # Standard deviation of the normal weight initialisation.
    init_method_std: float = 0.02
    # Fresh weights: layout_independent (the same at any TP/PP/EP for a seed) or megatron.
    init: str = "layout_independent"
    # local: Megatron's own parallel linears (CPU and GPU); te: Transformer Engine modules.
    backend: str = "local"

    @property
    def num_layers(self) -> int:
        return len(self.hybrid_pattern)

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels else self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    def count(self, symbol: str) -> int:
        return self.hybrid_pattern.count(symbol)


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a mapping (a Hydra node), rejecting unknown keys by name."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", values[unknown[0]], f"unknown key; allowed keys: {sorted(known)}")
    cfg = ModelConfig(**dict(values))
    validate_model_config(cfg)
    return cfg


def _positive(key: str, value: Any) -> None:
    require_positive_int(f"model.{key}", value)


def _divides(key: str, value: int, divisor_key: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ConfigError(f"model.{key}", value, f"must be divisible by model.{divisor_key}={divisor}")


def validate_model_config(cfg: ModelConfig) -> None:
    """Check every field that the pattern uses; raise ConfigError before any allocation."""
    if not cfg.hybrid_pattern:
        raise ConfigError("model.hybrid_pattern", cfg.hybrid_pattern, f"needs at least one layer symbol of {sorted(LAYER_SYMBOLS)}")
    for i, symbol in enumerate(cfg.hybrid_pattern):
        if symbol not in LAYER_SYMBOLS:
            allowed = ", ".join(f"'{s}' ({d})" for s, d in LAYER_SYMBOLS.items())
            raise ConfigError("model.hybrid_pattern", cfg.hybrid_pattern, f"unknown symbol {symbol!r} at position {i}; allowed: {allowed}")
    for key in ("hidden_size", "vocab_size", "max_sequence_length"):
        _positive(key, getattr(cfg, key))
    require_choice("model.backend", cfg.backend, BACKENDS)
    require_choice("model.init", cfg.init, INITS)
    require_choice("model.activation", cfg.activation, ACTIVATIONS)
    if not (isinstance(cfg.norm_eps, (int, float)) and cfg.norm_eps > 0):
        raise ConfigError("model.norm_eps", cfg.norm_eps, "must be a positive number")
    if not (isinstance(cfg.init_method_std, (int, float)) and cfg.init_method_std > 0):
        raise ConfigError("model.init_method_std", cfg.init_method_std, "must be a positive number")

    if cfg.count(ATTENTION):
        for key in ("num_attention_heads", "num_query_groups"):
            _positive(key, getattr(cfg, key))
        _divides("num_attention_heads", cfg.num_attention_heads, "num_query_groups", cfg.num_query_groups)
        if cfg.kv_channels is None:  # the head width is derived from the hidden size
            _divides("hidden_size", cfg.hidden_size, "num_attention_heads", cfg.num_attention_heads)
        else:
            _positive("kv_channels", cfg.kv_channels)

    if cfg.count(MAMBA):
        for key in ("mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "mamba_chunk_size"):
            _positive(key, getattr(cfg, key))
        _divides("mamba_num_heads", cfg.mamba_num_heads, "mamba_num_groups", cfg.mamba_num_groups)
        if isinstance(cfg.mamba_dt_min, bool) or not isinstance(cfg.mamba_dt_min, (int, float)) or not 0 <= cfg.mamba_dt_min < 1:
            raise ConfigError("model.mamba_dt_min", cfg.mamba_dt_min, "must be a number in [0, 1) (0: no clamp)")
        if isinstance(cfg.mamba_conv_kernel, bool) or not isinstance(cfg.mamba_conv_kernel, int) or cfg.mamba_conv_kernel < 2:
            raise ConfigError("model.mamba_conv_kernel", cfg.mamba_conv_kernel, "must be an integer >= 2")

    if cfg.count(MLP):
        _positive("ffn_hidden_size", cfg.ffn_hidden_size)

    if cfg.count(MOE):
        for key in ("moe_num_experts", "moe_router_topk", "moe_ffn_hidden_size"):
            _positive(key, getattr(cfg, key))
        if cfg.moe_router_topk > cfg.moe_num_experts:
            raise ConfigError(
                "model.moe_router_topk", cfg.moe_router_topk,
                f"must be between 1 and model.moe_num_experts={cfg.moe_num_experts}",
            )
        if isinstance(cfg.moe_shared_expert_ffn_hidden_size, bool) or not isinstance(cfg.moe_shared_expert_ffn_hidden_size, int) or cfg.moe_shared_expert_ffn_hidden_size < 0:
            raise ConfigError("model.moe_shared_expert_ffn_hidden_size", cfg.moe_shared_expert_ffn_hidden_size, "must be an integer >= 0 (0: no shared expert)")
        require_choice("model.moe_router_score_function", cfg.moe_router_score_function, ROUTER_SCORE_FUNCTIONS)
        require_choice("model.moe_token_dispatcher", cfg.moe_token_dispatcher, TOKEN_DISPATCHERS)
        if cfg.moe_router_topk_scaling_factor is not None and not cfg.moe_router_topk_scaling_factor > 0:
            raise ConfigError("model.moe_router_topk_scaling_factor", cfg.moe_router_topk_scaling_factor, "must be a positive number or null")
        if cfg.moe_router_enable_expert_bias and cfg.moe_router_score_function != "sigmoid":
            raise ConfigError("model.moe_router_enable_expert_bias", True, "expert bias needs model.moe_router_score_function='sigmoid'")
