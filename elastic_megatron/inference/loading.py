"""Opening any checkpoint to run it: the one loading path of the generator, the evaluation
tools and the server.

`open_for_inference(path)` reads what a checkpoint says about itself without loading a
tensor, for every kind this project writes or reads:
- our checkpoints (run dir or iter_* dir): a parent, an elastic checkpoint, an import, a
  slice (BF16 or FP32, or a quantized slice: BF16 master weights with the parent's scales
  in its metadata);
- a Hugging Face Nemotron-H directory (config.json + safetensors): an export, a slice, the
  released checkpoints, and quantized exports in ModelOpt's unified format (FP8, NVFP4).

`InferenceCheckpoint.load_model()` then builds the model and loads it. A checkpoint that is
one quantized model runs as the quantized model it is: an HF FP8/NVFP4 export has its packed
weights decoded to the values the serving kernels multiply with (quant/export.py) and each
quantized linear's input fake-quantized with the export's `input_scale`; a quantized slice
of our format has weights and inputs fake-quantized with the scales it records. Either way
the logits are those of the fake-quantized elastic checkpoint at that budget (the parent's
scales, nested quantization: tests/test_export_engines.py). An elastic checkpoint that
carries QAD scales is loaded as its BF16 weights (its budgets are views built later, see
inference/budgets.py); quantize its budgets with quant/hooks.attach.

The tokenizer is the one the checkpoint was trained with, wherever it is recorded
(convert/checkpoint_tokenizer.py); the exporters carry the same one into every HF directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.convert.checkpoint_tokenizer import checkpoint_tokenizer, is_hf_dir

HF = "hf"
MEGATRON = "megatron"


@dataclass
class InferenceCheckpoint:
    path: Path  # the directory read (for ours, the resolved iter_* dir)
    format: str  # HF or MEGATRON
    cfg: ModelConfig
    # our checkpoint metadata; for an HF directory, the description of the tokenizer it holds
    # ({"data": {"tokenizer": ...}}, as training records it) or {}
    meta: dict = field(default_factory=dict)
    quantization: Optional[dict] = None  # the scales it runs with (a quant record), or None

    def tokenizer(self, override: Optional[str] = None):
        return checkpoint_tokenizer(self.path, self.meta, override)

    def load_model(self, dtype: torch.dtype = torch.float32):
        """The model, weights loaded (in `dtype`), quantized as the checkpoint is."""
        from elastic_megatron.models.hybrid import build_model

        model = build_model(self.cfg, params_dtype=dtype)
        if self.format == HF:
            _load_hf_weights(self, model, dtype)
        else:
            from elastic_megatron.checkpoint.store import load_model_weights
            from elastic_megatron.quant.hooks import attach

            load_model_weights(self.path, model)
            if self.quantization is not None:
                q = self.quantization
                attach(model, q, q["format"], q["recipe"])
        return model.eval()


def open_for_inference(path: str | Path, key: str = "--checkpoint") -> InferenceCheckpoint:
    """What `path` holds (see the module docstring), checked, no tensor loaded."""
    path = Path(path)
    if is_hf_dir(path):
        return _open_hf(path)
    from elastic_megatron.checkpoint.metadata import checkpoint_model_config
    from elastic_megatron.checkpoint.store import resolve_checkpoint_dir

    try:
        directory = resolve_checkpoint_dir(path)
    except FileNotFoundError as err:
        raise ConfigError(key, str(path), f"no checkpoint there ({err}; or a Hugging Face directory with config.json "
                          "and *.safetensors)") from None
    cfg, meta = checkpoint_model_config(directory)
    elastic = bool((meta.get("elastic") or {}).get("budgets"))
    return InferenceCheckpoint(directory, MEGATRON, cfg, meta, None if elastic else meta.get("quantization"))


def _open_hf(path: Path) -> InferenceCheckpoint:
    from elastic_megatron.checkpoint import verify
    from elastic_megatron.checkpoint.manifest import has_manifest, verify_manifest
    from elastic_megatron.convert import hf_nemotron_h as hf
    from elastic_megatron.convert.tensors import SafetensorsSource
    from elastic_megatron.data.tokenizer import tokenizer_of_hf_dir
    from elastic_megatron.quant.export import DequantizedSource, hf_quant_format

    if has_manifest(path):  # written by our exporter: every byte as exported
        verify_manifest(path, check_hashes=verify.level() == "hashes")
    cfg = hf.model_config_from_hf(hf.read_hf_config(path), name=path.name)
    fmt = hf_quant_format(path)
    record = DequantizedSource(SafetensorsSource(path), fmt).scales(cfg) if fmt else None
    tok = tokenizer_of_hf_dir(path)
    return InferenceCheckpoint(path, HF, cfg, {"data": {"tokenizer": tok.describe()}} if tok is not None else {}, record)


def _load_hf_weights(ckpt: InferenceCheckpoint, model, dtype: torch.dtype) -> None:
    from elastic_megatron.convert import hf_nemotron_h as hf
    from elastic_megatron.convert.tensors import SafetensorsSource
    from elastic_megatron.quant.export import DequantizedSource
    from elastic_megatron.quant.hooks import QuantHooks

    source = SafetensorsSource(ckpt.path)
    q = ckpt.quantization
    flat = hf.hf_to_flat(DequantizedSource(source, q["format"]) if q else source, ckpt.cfg)
    hf.check_shapes(flat, ckpt.cfg, str(ckpt.path))
    model.load_state_dict({n: flat.get(n).to(dtype) for n in flat.names()}, strict=False)
    if q is not None:
        hooks = QuantHooks(model, q["format"], q["recipe"])
        hooks.load_amax(q["amax"])
        for quantizer in hooks.weight_q.values():
            quantizer.disable()  # the weights already are the decoded packed values


# ---- precision of the budgets ----------------------------------------------------------------

PRECISIONS = ("bf16", "fp8", "nvfp4")


def budget_quantization(ckpt: InferenceCheckpoint, precision: Optional[str], calibration_batches: int = 16,
                        key: str = "--precision") -> Optional[dict]:
    """The scales every budget of `ckpt` runs fake-quantized with (a QuantHooks record), or
    None to run them as stored. One set of scales serves every budget (nested quantization),
    so a budget's logits equal those of its quantized slice.

    `precision` None: as the checkpoint is — a QAD elastic checkpoint with its own scales, a
    quantized slice or export as its format, anything else unquantized. "bf16": the stored
    weights, no quantization (a QAD checkpoint's BF16 master weights). "fp8"/"nvfp4": the
    checkpoint's own scales when it records scales of that format (QAD), else post-training
    quantization calibrated at every budget on the training data its run recorded
    (`calibration_batches` micro-batches, as tools/evaluate_elastic.py and slicing do)."""
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(key, precision, f"allowed: {list(PRECISIONS)}")
    if ckpt.quantization is not None:  # one quantized model: it runs as its format, set at load
        own = ckpt.quantization["format"]
        if precision not in (None, own):
            raise ConfigError(key, precision, f"{ckpt.path} is a {own} checkpoint and runs as one: omit {key} or give {own}")
        return None
    recorded = ckpt.meta.get("quantization") if ckpt.format == MEGATRON else None
    if precision is None:
        return recorded
    if precision == "bf16":
        return None
    if recorded is not None and recorded["format"] == precision:
        return recorded
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ConfigError("--calibration-batches", calibration_batches, "must be a positive integer")
    if ckpt.format == HF:
        raise ConfigError(key, precision, f"{ckpt.path} is a BF16 Hugging Face directory, which records no calibration "
                          "data: quantize the elastic checkpoint it came from, or export a quantized slice")
    from elastic_megatron.quant.calibrate import ptq_scales

    return ptq_scales(ckpt.path, precision, "aggressive", calibration_batches, key=key)
