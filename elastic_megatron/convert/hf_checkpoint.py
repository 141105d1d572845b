"""HF Nemotron-H import and export jobs (tools/import_hf.py, tools/export_hf.py).

Both stream tensor by tensor: a 30B checkpoint is never in memory, only the largest
tensor being converted (plus, for our checkpoints, one layer's stacked experts).
"""

from __future__ import annotations

from pathlib import Path

from elastic_megatron.checkpoint import verify
from elastic_megatron.checkpoint.manifest import has_manifest, verify_manifest
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.convert import hf_nemotron_h as hf
from elastic_megatron.convert.megatron_dist import DistCheckpointSource
from elastic_megatron.convert.output import copy_tokenizer, export_tokenizer, precision_dtype, staged, write_hf, write_megatron
from elastic_megatron.convert.tensors import SafetensorsSource

def import_hf(hf_dir: str | Path, target: str | Path, precision: str = "bf16", name: str = "nemotron_h_import",
              overwrite: bool = False) -> Path:
    """HF Nemotron-H directory -> our checkpoint (run-dir layout) + model recipe."""
    dtype = precision_dtype(precision)
    target = Path(target)
    hf_dir = require_dir(hf_dir, "--hf-dir")
    if has_manifest(hf_dir):  # written by our exporter: every byte as exported
        verify_manifest(hf_dir, check_hashes=verify.level() == "hashes")
    cfg = hf.model_config_from_hf(hf.read_hf_config(hf_dir), name=name)
    flat = hf.hf_to_flat(SafetensorsSource(hf_dir), cfg)  # checks shards and names before writing
    hf.check_shapes(flat, cfg, str(hf_dir))
    with staged(target, overwrite) as tmp:
        write_megatron(tmp, cfg, flat, dtype, imported_from={"format": "hf_nemotron_h", "path": str(hf_dir)})
        copy_tokenizer(hf_dir, tmp / "tokenizer")
    return target


def export_hf(source: str | Path, target: str | Path, precision: str = "bf16", overwrite: bool = False,
              tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Our checkpoint (any non-elastic or elastic checkpoint: the full model) -> HF dir,
    carrying the tokenizer of `tokenizer_dir`, else the one the checkpoint records."""
    dtype = precision_dtype(precision)
    target = Path(target)
    if tokenizer_dir is not None:
        require_dir(tokenizer_dir, "--tokenizer-dir")
    src = DistCheckpointSource(source)
    tokenizer = export_tokenizer(src.dir, src.meta, src.cfg, tokenizer_dir)
    with staged(target, overwrite) as tmp:
        write_hf(tmp, src.cfg, src, dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)
    return target


def require_dir(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(key, str(path), "is not a directory")
    return path
