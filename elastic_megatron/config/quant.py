"""Quantization schema (recipes/quant/*.yaml): which format and which of ModelOpt's
Nemotron-H recipes, for nested quantization-aware distillation (QAD) and post-training
quantization (PTQ). `format: none` trains in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic_megatron.config.errors import require_choice, require_positive_int

QUANT_FORMATS = ("none", "fp8", "nvfp4")
QUANT_RECIPES = ("aggressive", "conservative")


@dataclass
class QuantConfig:
    # none | fp8 | nvfp4 (weights and activations of the recipe's linears).
    format: str = "none"
    # ModelOpt's MAMBA_MOE_<FORMAT>_<RECIPE>_CFG: aggressive quantizes the Mamba in/out
    # projections too; conservative keeps them in BF16 (see elastic_megatron/quant/recipes.py).
    recipe: str = "aggressive"
    # Micro-batches of training data for max calibration of the activation scales, run at
    # every budget (when the starting checkpoint carries no scales of this format).
    calibration_batches: int = 16


def validate_quant_settings(q: QuantConfig) -> None:
    require_choice("quant.format", q.format, QUANT_FORMATS)
    require_choice("quant.recipe", q.recipe, QUANT_RECIPES)
    require_positive_int("quant.calibration_batches", q.calibration_batches)
