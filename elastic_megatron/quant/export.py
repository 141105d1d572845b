"""Quantized checkpoints as files: the packed tensors of ModelOpt's unified HF format,
taken from the parent and cut into a budget's sub-blocks (never re-quantized).

Per quantized linear `M` (flat naming, then renamed to HF like every other tensor):
- fp8:   M.weight (float8_e4m3fn), M.weight_scale (fp32 scalar), M.input_scale;
- nvfp4: M.weight (uint8, two E2M1 values per byte), M.weight_scale (float8_e4m3fn, one
         per block of 16 input channels), M.weight_scale_2 (fp32 scalar), M.input_scale.
`encoded_source` quantizes each weight of the *parent* once, with the parent's scale;
`slice_encoded` then applies the budget's re-indexing (elastic/reindex.py) to the
encoded tensors: rows as they are, input columns in whole blocks (2 values per byte of
the packed weight, 16 per block scale). `hf_quant_config.json` and config.json's
`quantization_config` carry ModelOpt's fields, which vLLM and TensorRT-LLM read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from elastic_megatron.config.model import ModelConfig
from elastic_megatron.convert.tensors import MappedSource, TensorSource
from elastic_megatron.elastic.reindex import ModelIndex, copy_take, expert_slots, reindex_rule
from elastic_megatron.quant import formats
from elastic_megatron.quant.recipes import linear_modules, quantized_modules

SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")


def _scale_names(fmt: str) -> tuple[str, ...]:
    return SCALE_SUFFIXES if fmt == "nvfp4" else ("weight_scale", "input_scale")


# (format, encoded tensor) -> input columns per stored column: packed NVFP4 bytes hold 2,
# block scales cover 16, FP8 weights 1. Per-tensor scales have no columns.
_COLUMNS_PER_UNIT = {("nvfp4", "weight"): 2, ("nvfp4", "weight_scale"): formats.BLOCK, ("fp8", "weight"): 1}
# Their dtypes (as formats.encode_weight writes them); per-tensor scales are fp32.
_ENCODED_DTYPES = {("nvfp4", "weight"): torch.uint8, ("nvfp4", "weight_scale"): torch.float8_e4m3fn,
                   ("fp8", "weight"): torch.float8_e4m3fn}


class EncodedSource(TensorSource):
    """The parent's flat tensors with every quantized weight replaced by its encoded
    tensors (`record` holds the scales). One weight is encoded at a time (cached for its
    scale tensors, which the writers ask for right after it)."""

    def __init__(self, base: TensorSource, record: dict):
        self.base, self.fmt, self.amax = base, record["format"], record["amax"]
        present = set(base.names())
        self.quantized = {m for m in self.amax if f"{m}.weight" in present}
        self._cache: tuple[Optional[str], dict] = (None, {})

    def names(self) -> list[str]:
        out = []
        for n in self.base.names():
            out.append(n)
            module = n[: -len(".weight")] if n.endswith(".weight") else None
            if module in self.quantized:
                out.extend(f"{module}.{s}" for s in _scale_names(self.fmt))
        return out

    def _encoded(self, module: str) -> dict:
        if self._cache[0] != module:
            w = self.base.get(f"{module}.weight")
            enc = formats.encode_weight(self.fmt, w, torch.tensor(self.amax[module]["weight"]))
            enc["input_scale"] = formats.tensor_scale(self.fmt, torch.tensor(self.amax[module]["input"]))
            self._cache = (module, enc)
        return self._cache[1]

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        module, part = _split(name, self.quantized)
        if module is None:
            return self.base._get(name, meta)
        if meta:
            rows, cols = self.base.spec(f"{module}.weight").shape
            per_unit = _COLUMNS_PER_UNIT.get((self.fmt, part))
            dtype = _ENCODED_DTYPES.get((self.fmt, part), torch.float32)
            return torch.empty((rows, cols // per_unit) if per_unit else (), dtype=dtype, device="meta")
        return self._encoded(module)[part]


def _block_columns(cols: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Kept input columns -> kept units of `per_unit` columns (2 per packed byte, 16 per
    block scale); the columns must be whole, ordered units (check_block_alignment)."""
    units = cols.reshape(-1, per_unit)
    first = units[:, 0]
    if (first % per_unit).any() or not torch.equal(units, first[:, None] + torch.arange(per_unit)):
        raise ValueError(f"a slice keeps input columns that are not whole blocks of {per_unit}; NVFP4 nesting needs "
                         f"widths that are multiples of {formats.BLOCK}")
    return first // per_unit


def _unit_take(per_unit: int):
    """The slicing cut, with input columns turned into whole stored units."""
    return lambda t, rows=None, cols=None: copy_take(t, rows, None if cols is None else _block_columns(cols, per_unit))


def slice_encoded(cfg: ModelConfig, index: ModelIndex, encoded: EncodedSource) -> MappedSource:
    """The budget `index` of an encoded parent: every tensor re-indexed by the slicing
    rules, encoded weights and block scales in whole units, per-tensor scales as they are."""
    rules = {}
    slots = expert_slots(index)
    for name in encoded.names():
        module, part = _split(name, encoded.quantized)
        if module is None:
            rule = reindex_rule(cfg, index, name, slots)
            if rule is not None:
                rules[rule[0]] = ((name,), rule[1])
            continue
        per_unit = _COLUMNS_PER_UNIT.get((encoded.fmt, part))
        if per_unit is not None:
            rule = reindex_rule(cfg, index, f"{module}.weight", slots, take=_unit_take(per_unit))
        else:  # a per-tensor scale: only its name follows the slice
            rule = reindex_rule(cfg, index, f"{module}.weight", slots)
            rule = None if rule is None else (rule[0], lambda t: t)
        if rule is not None:
            new_module = rule[0][: -len(".weight")]
            rules[f"{new_module}.{part}"] = ((name,), rule[1])
    return MappedSource(encoded, rules)


def _split(name: str, quantized: set[str]) -> tuple[Optional[str], Optional[str]]:
    for suffix in ("weight",) + SCALE_SUFFIXES:
        if name.endswith("." + suffix) and name[: -len(suffix) - 1] in quantized:
            return name[: -len(suffix) - 1], suffix
    return None, None


def sliced_record(cfg: ModelConfig, index: ModelIndex, record: dict) -> dict:
    """The parent's scales under the slice's module names (experts renumbered or dropped)."""
    slots, amax = expert_slots(index), {}
    for module, a in record["amax"].items():
        rule = reindex_rule(cfg, index, f"{module}.weight", slots)
        if rule is not None:
            amax[rule[0][: -len(".weight")]] = dict(a)
    return {**record, "amax": dict(sorted(amax.items()))}


def hf_quantized_view(hf_view: MappedSource, flat: MappedSource, fmt: str) -> MappedSource:
    """Add the scale tensors to an HF view (convert/hf_nemotron_h.flat_to_hf) of an encoded
    flat source: each quantized HF weight `X.weight` reads flat `M.weight`, so `X.<scale>`
    reads `M.<scale>`."""
    flat_names = set(flat.names())
    rules = dict(hf_view.rules)
    for hf_name, (inputs, fn) in hf_view.rules.items():
        if len(inputs) == 1 and inputs[0].endswith(".weight") and hf_name.endswith(".weight"):
            module = inputs[0][: -len(".weight")]
            for s in _scale_names(fmt):
                if f"{module}.{s}" in flat_names:
                    rules[f"{hf_name[: -len('.weight')]}.{s}"] = ((f"{module}.{s}",), lambda t: t)
    return MappedSource(flat, rules)


def excluded_modules(cfg: ModelConfig, fmt: str, recipe: str) -> list[str]:
    """The HF modules a quantized export keeps unquantized, as ModelOpt's Megatron exporter
    lists them (modelopt/torch/export/unified_export_megatron.py: every module it exports
    whose quantization format is none, norms aside, under the HF prefix of its
    `nemotron_h_causal_lm_export` rule, sorted): the embeddings, the output layer, every
    Mamba conv1d, every MoE router (`mixer.gate`) and each linear the recipe keeps in BF16."""
    from elastic_megatron.convert.hf_nemotron_h import hf_linear_names

    linears = linear_modules(cfg)
    on = set(quantized_modules(linears, fmt, recipe))
    names = {"backbone.embeddings", "lm_head"}
    names.update(n for m in linears if m not in on for n in hf_linear_names(m))
    for i, symbol in enumerate(cfg.hybrid_pattern):
        if symbol == "M":
            names.add(f"backbone.layers.{i}.mixer.conv1d")
        elif symbol == "E":
            names.add(f"backbone.layers.{i}.mixer.gate")
    return sorted(names)


def quant_config_fields(cfg: ModelConfig, record: dict) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json's quantization_config) as ModelOpt's unified
    exporter writes them: the algorithm, the group size, and the excluded (BF16) modules
    under their HF names (`excluded_modules`; config.json's `ignore` is the same list)."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    fmt = record["format"]
    quantization = {"quant_algo": "NVFP4" if fmt == "nvfp4" else "FP8", "kv_cache_quant_algo": None}
    if fmt == "nvfp4":
        quantization["group_size"] = formats.BLOCK
    quantization["exclude_modules"] = excluded_modules(cfg, fmt, record["recipe"])
    hf_quant = {"producer": {"name": "modelopt", "version": record.get("modelopt", "")}, "quantization": quantization}
    # config.json's form is ModelOpt's own conversion of the first.
    return hf_quant, convert_hf_quant_config_format(hf_quant)


def write_quant_configs(directory: Path, cfg: ModelConfig, record: dict) -> None:
    hf_quant, qc = quant_config_fields(cfg, record)
    (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
    path = directory / "config.json"
    conf = json.loads(path.read_text())
    conf["quantization_config"] = qc
    path.write_text(json.dumps(conf, indent=2, allow_nan=False) + "\n")


# ---- reading a quantized HF export back ------------------------------------------------------

_ALGORITHMS = {"FP8": "fp8", "NVFP4": "nvfp4"}


def hf_quant_format(directory: Path) -> Optional[str]:
    """fp8 / nvfp4 of a quantized HF export (its hf_quant_config.json, else config.json's
    quantization_config), None for an unquantized one; a format this project does not
    write is refused by name."""
    from elastic_megatron.config.errors import ConfigError

    directory = Path(directory)
    path = directory / "hf_quant_config.json"
    if path.is_file():
        algo = (json.loads(path.read_text()).get("quantization") or {}).get("quant_algo")
    else:
        qc = json.loads((directory / "config.json").read_text()).get("quantization_config")
        if qc is None:
            return None
        algo = qc.get("quant_algo") if qc.get("quant_method") == "modelopt" else f"{qc.get('quant_method')}"
    if algo not in _ALGORITHMS:
        raise ConfigError("quantization", algo, f"{directory} is quantized in a format this project does not read; "
                          f"allowed: ModelOpt {sorted(_ALGORITHMS)}")
    return _ALGORITHMS[algo]


class DequantizedSource(TensorSource):
    """The tensors of a quantized HF export (ModelOpt's unified format) with every packed
    weight decoded to the fp32 values the serving kernels multiply with, and the scale
    tensors left out: the view the HF adapters (convert/hf_nemotron_h.hf_to_flat) read."""

    def __init__(self, base: TensorSource, fmt: str):
        self.base, self.fmt = base, fmt
        self.present = set(base.names())
        self.quantized = {n[: -len(".weight")] for n in self.present
                          if n.endswith(".weight") and n[: -len("weight")] + "weight_scale" in self.present}

    def names(self) -> list[str]:
        return [n for n in self.base.names() if _split(n, self.quantized)[1] in (None, "weight")]

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        module, part = _split(name, self.quantized)
        if module is None:
            return self.base._get(name, meta)
        if meta:
            rows, cols = self.base.spec(name).shape
            return torch.empty((rows, cols * _COLUMNS_PER_UNIT[(self.fmt, "weight")]), dtype=torch.float32, device="meta")
        parts = {s: self.base.get(f"{module}.{s}") for s in ("weight",) + _scale_names(self.fmt)}
        return formats.decode_weight(self.fmt, parts)

    def scales(self, cfg: ModelConfig) -> dict:
        """The export's scales as a quant record of the model of `cfg` (flat module names):
        per-tensor amax = scale x the format's bound, for the weight (the weight scale, or
        NVFP4's second-level scale) and the input. A linear split into several HF tensors
        (q/k/v) takes the largest. The recipe is the one whose quantized linears are exactly
        the export's; an export that matches none is refused."""
        from elastic_megatron.config.errors import ConfigError
        from elastic_megatron.convert.hf_nemotron_h import hf_linear_names
        from elastic_megatron.quant.recipes import RECIPES

        bound = formats.max_bound(self.fmt)
        weight_part = "weight_scale_2" if self.fmt == "nvfp4" else "weight_scale"
        amax = {}
        for module in linear_modules(cfg):
            parts = [n for n in hf_linear_names(module) if n in self.quantized]
            if not parts:
                continue
            amax[module] = {kind: max(float(self.base.get(f"{p}.{scale}")) * bound for p in parts)
                            for kind, scale in (("weight", weight_part), ("input", "input_scale"))}
        found = sorted(amax)
        for recipe in RECIPES:
            if sorted(quantized_modules(linear_modules(cfg), self.fmt, recipe)) == found:
                return {"format": self.fmt, "recipe": recipe, "algorithm": "max", "amax": amax}
        raise ConfigError("quantization", f"{len(found)} quantized linears", "match no ModelOpt Nemotron-H recipe "
                          f"({list(RECIPES)}) of this model; this project reads the exports it writes")
