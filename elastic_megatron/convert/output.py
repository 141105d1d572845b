"""Writing converted or sliced checkpoints: precision, staging, the two output formats.

Every tool writes into a hidden temporary directory next to the target and renames it
into place only when everything is written, so an error or a kill never leaves a
half-written checkpoint under the target name.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from elastic_megatron.checkpoint.manifest import write_manifest
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.convert import hf_nemotron_h as hf
from elastic_megatron.convert.megatron_dist import config_yaml, write_dist_checkpoint, write_model_recipe
from elastic_megatron.convert.tensors import CastSource, TensorSource, write_safetensors

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Quantized exports: the recipe's linears in the format, everything else in BF16.
QUANTIZED = ("fp8", "nvfp4")
FORMATS = ("megatron", "hf", "both")


def precision_dtype(precision: str, quantized_ok: bool = False) -> torch.dtype:
    """The dtype of the unquantized tensors of an export in `precision`."""
    allowed = sorted(PRECISIONS) + (list(QUANTIZED) if quantized_ok else [])
    if precision in QUANTIZED and quantized_ok:
        return torch.bfloat16
    if precision not in PRECISIONS:
        extra = "" if quantized_ok else " (fp8 and nvfp4: tools/zero_shot_slicing.py, which quantizes with nested scales)"
        raise ConfigError("--precision", precision, f"allowed: {allowed}{extra}")
    return PRECISIONS[precision]


def check_target(target: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty target unless overwrite, before any work starts."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConfigError("--target-checkpoint", str(target), "exists and is not empty; pass --overwrite to replace it")
    return target


@contextmanager
def staged(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`,
    on any error it is removed and `target` is untouched."""
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def write_megatron(directory: Path, cfg: ModelConfig, flat: TensorSource, dtype: torch.dtype, **provenance) -> None:
    """Our checkpoint (run-dir layout) plus the model recipe the trainer needs for it."""
    cast = CastSource(flat, dtype, keep=hf.keep_fp32)
    write_dist_checkpoint(directory, cfg, cast, meta={"config": config_yaml(cfg), **provenance})
    write_model_recipe(directory, cfg)


def write_hf(directory: Path, cfg: ModelConfig, flat: TensorSource, dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30,
             tokenizer=None, adapt: Optional[Callable[[TensorSource], TensorSource]] = None,
             finish: Optional[Callable[[Path], None]] = None) -> dict:
    """An HF Nemotron-H directory (config.json in both conventions, generation_config.json,
    safetensors shards, the files of `tokenizer` (a ByteTokenizer or HFTokenizer: the one the
    checkpoint was trained with) and manifest.json with every file's size and hash) that
    transformers' NemotronHForCausalLM loads without custom code.
    `adapt` turns the HF view into what is written and `finish` adds to the directory
    before the manifest (quantized exports, elastic_megatron/quant/export.py)."""
    from elastic_megatron.data.tokenizer import hf_tokenizer_files, special_token_ids

    directory.mkdir(parents=True, exist_ok=True)
    hf.hf_config_from_model(cfg, dtype)  # refuse what HF cannot express before writing tensors
    view = hf.flat_to_hf(flat, cfg)
    view = CastSource(adapt(view) if adapt else view, dtype, keep=hf.keep_fp32)
    index = write_safetensors(directory, view, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    hf.write_hf_config(directory, cfg, dtype, special_token_ids(tokenizer) if tokenizer is not None else None)
    if tokenizer is not None:
        for name, content in hf_tokenizer_files(tokenizer).items():
            (directory / name).write_bytes(content)
    if finish is not None:
        finish(directory)
    write_manifest(directory)
    return index


# Tokenizer files of an HF directory, carried along on import (next to the imported checkpoint).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    found = [f for f in TOKENIZER_FILES if (src / f).exists()]
    if not found:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy2(src / f, dst / f)


def export_tokenizer(checkpoint_dir: Path, meta: dict, cfg: ModelConfig, tokenizer_dir: Optional[str | Path] = None):
    """The tokenizer an export of a checkpoint (a model of `cfg`) carries: the one in
    `tokenizer_dir` (a directory holding tokenizer.json) when given, else the one the
    checkpoint records (None when it records none). Checked before anything is written."""
    from elastic_megatron.convert.checkpoint_tokenizer import recorded_tokenizer
    from elastic_megatron.data.tokenizer import tokenizer_of_hf_dir

    if tokenizer_dir is None:
        tok = recorded_tokenizer(checkpoint_dir, meta, key="--tokenizer-dir")
    elif not Path(tokenizer_dir).is_dir():
        raise ConfigError("--tokenizer-dir", str(tokenizer_dir), "is not a directory")
    else:
        tok = tokenizer_of_hf_dir(tokenizer_dir)
        if tok is None:
            raise ConfigError("--tokenizer-dir", str(tokenizer_dir), "holds no tokenizer.json")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ConfigError("--tokenizer-dir", str(tokenizer_dir or tok.describe()),
                          f"has {tok.vocab_size} tokens, more than the model's vocabulary of {cfg.vocab_size}")
    return tok
