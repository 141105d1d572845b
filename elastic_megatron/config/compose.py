"""A recipe (recipes/<name>.yaml) and Hydra overrides composed to a `JobConfig`, with
Hydra's refusals (an unknown key, a value of the wrong type, a missing group option, an
override it cannot parse) raised as `ConfigError`: one `error:` line at an entry point.
Imports Hydra and the schema only, so a tool or benchmark refuses bad overrides in
seconds, before the trainer is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from elastic_megatron.config.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def compose_recipe(recipe: str, overrides: Sequence[str] = ()):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from elastic_megatron.config.schema import register_configs

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
            return OmegaConf.to_object(compose(config_name=recipe, overrides=list(overrides)))
    except HydraException as err:
        text = str(err).split("Config search path")[0] + (f" ({err.__cause__})" if err.__cause__ else "")
        key = "recipe" if "primary config" in text else "overrides"
        raise ConfigError(key, recipe if key == "recipe" else list(overrides), " ".join(text.split())) from None
