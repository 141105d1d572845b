"""Which linears are quantized: ModelOpt's Nemotron-H (Mamba-MoE) recipes, read as ModelOpt
reads them, and the block-size rule nested NVFP4 adds.

`MAMBA_MOE_{FP8,NVFP4}_{AGGRESSIVE,CONSERVATIVE}_CFG` list quantizer-name patterns in
order; the last pattern that matches a quantizer decides whether it is on. Both recipes
keep in BF16: the MoE routers, the Mamba conv1d, attention (linear_qkv, linear_proj) and
the output layer (embeddings and norms are not linears); `conservative` also keeps the
Mamba in_proj / out_proj. Everything else (Mamba projections in `aggressive`, dense MLPs,
routed and shared experts) has its weight and its input quantized.

Nested NVFP4: a budget's weight is a row/column sub-block of the parent's, and its
blocks of 16 input channels must be whole parent blocks, so every width on a quantized
input dimension must be a multiple of 16 (`check_block_alignment`). Output dimensions
(rows) have no such rule; neither has FP8 (one scale per tensor).
"""

from __future__ import annotations

import copy
import re
from fnmatch import fnmatch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig

RECIPES = ("aggressive", "conservative")

# Flat module name (layer prefix removed) -> the width axis of its input dimension.
_INPUT_AXIS = [
    (re.compile(r"^mixer\.in_proj$"), "hidden"),
    (re.compile(r"^mixer\.out_proj$"), "mamba_head_dim"),
    (re.compile(r"^self_attention\.linear_qkv$"), "hidden"),
    (re.compile(r"^self_attention\.linear_proj$"), None),  # whole heads of head_dim channels
    (re.compile(r"^mlp\.linear_fc1$"), "hidden"),
    (re.compile(r"^mlp\.linear_fc2$"), "ffn"),
    (re.compile(r"^mlp\.experts\.local_experts\.\d+\.linear_fc1$"), "hidden"),
    (re.compile(r"^mlp\.experts\.local_experts\.\d+\.linear_fc2$"), "moe_ffn"),
    (re.compile(r"^mlp\.shared_experts\.linear_fc1$"), "hidden"),
    (re.compile(r"^mlp\.shared_experts\.linear_fc2$"), "shared_ffn"),
]
_LAYER = re.compile(r"^decoder\.layers\.\d+\.(.+)$")


def modelopt_config(fmt: str, recipe: str) -> dict:
    """A copy of ModelOpt's recipe for the Nemotron-H family."""
    import modelopt.torch.quantization as mtq

    return copy.deepcopy(getattr(mtq, f"MAMBA_MOE_{fmt.upper()}_{recipe.upper()}_CFG"))


def _enabled(quantizer: str, entries: list[dict]) -> bool:
    on = False
    for entry in entries:
        if "parent_class" in entry or not fnmatch(quantizer, entry.get("quantizer_name", "")):
            continue
        on = entry["enable"] if "enable" in entry else "cfg" in entry
    return on


def quantized(module: str, fmt: str, recipe: str, which: str = "weight") -> bool:
    """Whether the recipe quantizes `which` (weight or input) of linear `module`."""
    return _enabled(f"{module}.{which}_quantizer", modelopt_config(fmt, recipe)["quant_cfg"])


def quantized_modules(linears, fmt: str, recipe: str) -> list[str]:
    """The linears (flat module names) whose weight the recipe quantizes."""
    entries = modelopt_config(fmt, recipe)["quant_cfg"]
    return [m for m in linears if _enabled(f"{m}.weight_quantizer", entries)]


def linear_modules(cfg: ModelConfig) -> list[str]:
    """Flat names of every linear layer of the decoder (the quantization candidates)."""
    from elastic_megatron.models.counter import parameter_inventory

    return [e.name[: -len(".weight")] for e in parameter_inventory(cfg)
            if e.layer is not None and e.name.endswith(".weight") and len(e.shape) == 2 and input_axis(e.name[: -len(".weight")]) != "?"]


def input_axis(module: str):
    """The width axis on the input dimension of a decoder linear ('?' if not a linear)."""
    m = _LAYER.match(module)
    rest = m.group(1) if m else module
    for pattern, axis in _INPUT_AXIS:
        if pattern.match(rest):
            return axis
    return "?"


def check_block_alignment(cfg: ModelConfig, fmt: str, recipe: str, widths: dict[str, list[int]], key: str) -> None:
    """Refuse NVFP4 nesting whose blocks would straddle a budget's boundary: `widths` maps
    axis -> every width any budget can take on it (pinned widths and router candidates)."""
    if fmt != "nvfp4":
        return
    from elastic_megatron.quant.formats import BLOCK

    for module in quantized_modules(linear_modules(cfg), fmt, recipe):
        axis = input_axis(module)
        if axis is None:  # attention output: whole heads
            values = {"head_dim": [cfg.head_dim]}
        elif axis == "mamba_head_dim":  # out_proj: each Mamba head's first channels
            values = {"mamba_head_dim": sorted({cfg.mamba_head_dim, *widths.get(axis, [])})}
        else:
            values = {axis: sorted({getattr(cfg, _PARENT_FIELD[axis]), *widths.get(axis, [])})}
        for name, vals in values.items():
            bad = [v for v in vals if v % BLOCK]
            if bad:
                raise ConfigError(key, f"{name}={bad}", f"NVFP4 quantizes the input of {module} in blocks of {BLOCK}; every width "
                                  f"of the {name} axis (parent and budgets) must be a multiple of {BLOCK}, so a nested "
                                  f"model's blocks are whole blocks of the parent's")


_PARENT_FIELD = {"hidden": "hidden_size", "ffn": "ffn_hidden_size", "moe_ffn": "moe_ffn_hidden_size",
                 "shared_ffn": "moe_shared_expert_ffn_hidden_size", "mamba_head_dim": "mamba_head_dim"}
