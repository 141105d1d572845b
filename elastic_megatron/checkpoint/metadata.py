"""What a checkpoint says about itself, read without loading any tensor shard: step,
data position, the resolved config it was written with (so its architecture), and the
stage-specific metadata (sort index, budgets). `require_same_architecture` is the one
check that a checkpoint fits a model config, run before anything is built.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron.core import dist_checkpointing

from elastic_megatron.checkpoint.store import open_checkpoint
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig, model_config_from_dict

# Fields that must agree between a checkpoint and the model it is loaded into.
ARCHITECTURE_FIELDS = (
    "hybrid_pattern", "hidden_size", "vocab_size", "num_attention_heads", "num_query_groups", "head_dim",
    "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "mamba_conv_kernel",
    "ffn_hidden_size", "moe_num_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_shared_expert_ffn_hidden_size", "moe_router_score_function", "activation",
)


def read_common_state(path: str | Path) -> dict:
    """step, meta and extra of a checkpoint without loading any tensor shard."""
    state = dist_checkpointing.load_common_state_dict(str(open_checkpoint(path)))
    return {k: state.get(k) for k in ("step", "consumed_samples", "meta", "extra")}


def checkpoint_model_config(path) -> tuple[ModelConfig, dict]:
    """The ModelConfig a checkpoint was written with (from its metadata), and its meta."""
    common = read_common_state(path)
    meta = common.get("meta") or {}
    if "config" not in meta:
        raise ConfigError("checkpoint", str(path), "has no resolved config in its metadata (not written by this project)")
    return model_config_from_dict(yaml.safe_load(meta["config"])["model"]), meta


def require_same_architecture(expected: ModelConfig, path, key: str) -> dict:
    """Raise ConfigError naming every field where checkpoint `path` differs from
    `expected`; returns the checkpoint's metadata."""
    try:
        found, meta = checkpoint_model_config(path)
    except FileNotFoundError as err:
        raise ConfigError(key, str(path), f"no checkpoint there ({err})") from None
    diffs = [f"{f}: checkpoint {getattr(found, f)!r} vs model {getattr(expected, f)!r}"
             for f in ARCHITECTURE_FIELDS if getattr(found, f) != getattr(expected, f)]
    if diffs:
        raise ConfigError(key, str(path), "architecture does not match the model config: " + "; ".join(diffs))
    return meta
