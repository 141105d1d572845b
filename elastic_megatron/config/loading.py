"""Turn composed Hydra nodes into validated dataclasses."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from elastic_megatron.config.model import ModelConfig, model_config_from_dict


def to_plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def load_model_config(node: Any) -> ModelConfig:
    """ModelConfig from the `model` node of a composed recipe (validated)."""
    return model_config_from_dict(to_plain(node))
