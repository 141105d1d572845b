"""The tokenizer of a checkpoint, wherever it is recorded, and whether a directory is a
Hugging Face model directory. The exporters carry this tokenizer into every HF directory
they write (convert/output.py); inference/loading.py opens checkpoints with it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from elastic_megatron.config.errors import ConfigError


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json and safetensors shards, no dist checkpoint)."""
    path = Path(path)
    return ((path / "config.json").is_file() and not (path / "metadata.json").exists()
            and any(path.glob("*.safetensors")))


def recorded_tokenizer(directory: Path, meta: dict, key: str = "--tokenizer"):
    """The tokenizer a checkpoint records, or None when it records none: the files of an HF
    directory, the description its training data recorded, the files next to an import, the
    tokenizer of its data prefixes, or that of the checkpoint it was sliced from."""
    from elastic_megatron.data.tokenizer import tokenizer_from_description, tokenizer_of_hf_dir

    directory = Path(directory)
    if is_hf_dir(directory):
        return tokenizer_of_hf_dir(directory)
    described = (meta.get("data") or {}).get("tokenizer")
    if described:
        try:
            return tokenizer_from_description(described)
        except ConfigError as err:  # e.g. a tokenizer.json path of the machine that trained it
            raise ConfigError(key, None, f"the checkpoint's tokenizer {described} cannot be loaded here "
                              f"({err.allowed}); pass {key} <a tokenizer.json, or a directory holding one>") from None
    run_dir = directory.parent.parent if directory.parent.name == "checkpoints" else directory
    imported = tokenizer_of_hf_dir(run_dir / "tokenizer")
    if imported is not None:
        return imported
    config = meta.get("config")
    if config:
        import yaml

        data = yaml.safe_load(config).get("data") or {}
        if data.get("prefixes"):
            from elastic_megatron.config.schema import split_blend
            from elastic_megatron.data.datasets import load_tokenizer_for

            try:
                return load_tokenizer_for(split_blend(data["prefixes"], None)[0], data.get("tokenizer"))
            except ConfigError:
                pass
    source = (meta.get("sliced_from") or {}).get("checkpoint")
    if source and Path(source).exists():
        from elastic_megatron.checkpoint.metadata import checkpoint_model_config
        from elastic_megatron.checkpoint.store import resolve_checkpoint_dir

        _, source_meta = checkpoint_model_config(source)
        return recorded_tokenizer(resolve_checkpoint_dir(source), source_meta, key)
    return None


def checkpoint_tokenizer(directory: Path, meta: dict, override: Optional[str] = None):
    """`override` (a tokenizer.json, or a directory holding one) or the tokenizer the
    checkpoint records; a checkpoint that records none needs the override."""
    from elastic_megatron.data.tokenizer import HFTokenizer

    if override:
        if not Path(override).exists():
            raise ConfigError("--tokenizer", override, "does not exist (a tokenizer.json, or a directory holding one)")
        return HFTokenizer(override)
    tok = recorded_tokenizer(directory, meta)
    if tok is None:
        raise ConfigError("--tokenizer", None, f"no tokenizer is recorded for {directory}: pass --tokenizer <tokenizer.json>")
    return tok

