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


# ---- what the serving kernels need ------------------------------------------------------------
#
# A quantized linear of an export runs as one GEMM Y[M, N] = X[M, K] W[N, K]^T in the serving
# engines (vLLM, SGLang, TensorRT-LLM); N and K must be multiples of:
#   fp8   16: torch._scaled_mm, the per-tensor FP8 GEMM vLLM's ModelOpt FP8 linear names as its
#           kernel, refuses mat2 dimensions that are not multiples of 16 (its checks in
#           torch/_meta_registrations.py: "Expected both dimensions of mat2 to be divisible by
#           16"); vLLM's CUTLASS path (`_custom_ops.cutlass_scaled_mm`) needs the same 16 on
#           both dimensions of the weight and drops to a Triton kernel otherwise.
#   nvfp4 32: vLLM's `nvfp4_utils.pad_nvfp4_weight_for_cutlass`: the CUTLASS (and FlashInfer)
#           FP4 GEMMs need N and K divisible by 32 (vLLM pads the weight at load, other
#           engines do not); torch._scaled_mm on packed FP4 needs K/2 and N multiples of 16;
#           and the 16-value scale blocks need K % 16 == 0, which vLLM's
#           ModelOptNvFp4LinearMethod and TensorRT-LLM's NVFP4LinearMethod refuse otherwise.
# The Mamba in_proj is one GEMM over [z, x, B, C, dt] (vLLM's MambaMixer2 merges them), so
# its N is 2·heads·head_dim + 2·groups·state + heads. Released Nemotron 3 Nano widths (and
# the Star Elastic 23B / 12B budgets) are multiples of 32 on every such dimension.
KERNEL_ALIGNMENT = {
    "fp8": (16, "torch._scaled_mm / vLLM cutlass_scaled_mm: both GEMM dimensions multiples of 16"),
    "nvfp4": (32, "vLLM/FlashInfer CUTLASS FP4 GEMM: N and K multiples of 32 (vLLM pad_nvfp4_weight_for_cutlass)"),
}

# Flat module name (layer prefix removed) -> what sets its weight's rows (N) and columns (K).
_GEMM_DIMS = [
    (re.compile(r"^mixer\.in_proj$"), "2*mamba_heads*mamba_head_dim + 2*mamba_groups*state + mamba_heads", "hidden"),
    (re.compile(r"^mixer\.out_proj$"), "hidden", "mamba_heads*mamba_head_dim"),
    (re.compile(r"^self_attention\.linear_qkv$"), "(attn_heads + 2*query_groups)*head_dim", "hidden"),
    (re.compile(r"^self_attention\.linear_proj$"), "hidden", "attn_heads*head_dim"),
    (re.compile(r"^mlp\.linear_fc1$"), "ffn", "hidden"),
    (re.compile(r"^mlp\.linear_fc2$"), "hidden", "ffn"),
    (re.compile(r"^mlp\.experts\.local_experts\.\d+\.linear_fc1$"), "moe_ffn", "hidden"),
    (re.compile(r"^mlp\.experts\.local_experts\.\d+\.linear_fc2$"), "hidden", "moe_ffn"),
    (re.compile(r"^mlp\.shared_experts\.linear_fc1$"), "shared_ffn", "hidden"),
    (re.compile(r"^mlp\.shared_experts\.linear_fc2$"), "hidden", "shared_ffn"),
]


def _kind(module: str) -> str:
    """A linear's name without its layer and expert numbers (what repeats across layers)."""
    return re.sub(r"local_experts\.\d+\.", "local_experts.*.", _LAYER.sub(r"\1", module))


def kernel_misalignments(cfg: ModelConfig, fmt: str, recipe: str) -> list[tuple[str, str, int, str]]:
    """(linear kind, 'rows (N)' / 'columns (K)', size, what sets it) of every quantized GEMM
    dimension of a model of `cfg` that breaks `fmt`'s KERNEL_ALIGNMENT, once per kind."""
    from elastic_megatron.models.counter import parameter_inventory

    align = KERNEL_ALIGNMENT[fmt][0]
    shapes = {e.name[: -len(".weight")]: e.shape for e in parameter_inventory(cfg) if e.name.endswith(".weight")}
    out = {}
    for module in quantized_modules(linear_modules(cfg), fmt, recipe):
        kind = _kind(module)
        rest = _LAYER.match(module).group(1)
        n_axis, k_axis = next((n, k) for pattern, n, k in _GEMM_DIMS if pattern.match(rest))
        rows, cols = shapes[module]
        for dim, size, axis in (("rows (N)", rows, n_axis), ("columns (K)", cols, k_axis)):
            if size % align:
                out.setdefault((kind, dim), (kind, dim, int(size), axis))
    return list(out.values())


def check_kernel_alignment(parent: ModelConfig, cfg: ModelConfig, fmt: str, recipe: str, budget: str,
                           key: str = "--size") -> None:
    """Refuse a quantized export of budget `budget` (the model of `cfg`, nested in `parent`)
    one of whose quantized GEMM dimensions breaks the serving kernels' alignment. A dimension
    the parent itself breaks (a CPU toy preset's, see docs/quantization.md) is the parent's architecture,
    not the budget's choice: it is reported by tools/describe_model.py, not refused here."""
    inherited = {(k, d) for k, d, _, _ in kernel_misalignments(parent, fmt, recipe)}
    for kind, dim, size, axis in kernel_misalignments(cfg, fmt, recipe):
        if (kind, dim) not in inherited:
            align, rule = KERNEL_ALIGNMENT[fmt]
            raise ConfigError(key, budget, f"its {fmt} export would give {kind} {dim} = {size} (set by {axis}), not a "
                              f"multiple of {align} ({rule}); choose widths that keep it a multiple of {align}")


def kernel_report(parent: ModelConfig, budgets, recipe: str) -> dict[str, dict[str, str]]:
    """budget -> format -> 'ok', or why its export would not run on the serving kernels
    ('(parent)' marks a dimension the parent already breaks); `budgets`: (name, Widths)."""
    from elastic_megatron.elastic.widths import sub_model_config

    out = {}
    for name, widths in budgets:
        cfg = sub_model_config(parent, widths)
        row = {}
        for fmt in KERNEL_ALIGNMENT:
            inherited = {(k, d) for k, d, _, _ in kernel_misalignments(parent, fmt, recipe)}
            bad = [f"{k} {d}={size}{' (parent)' if (k, d) in inherited else ''}"
                   for k, d, size, _ in kernel_misalignments(cfg, fmt, recipe)]
            row[fmt] = "ok" if not bad else "no: " + "; ".join(bad)
        out[name] = row
    return out
