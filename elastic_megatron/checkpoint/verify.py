"""Nothing is loaded unverified: `verify_checkpoint` is called before any checkpoint is
read (resume, teacher and initial weights, slicing, export, evaluation).

- A checkpoint with a manifest (everything written since manifests exist) is compared
  with it: every file present with its size, nothing extra, and (level `hashes`, the
  default) every file's hash.
- A legacy checkpoint (no manifest) gets the structural checks that need no hashes:
  the files Megatron writes exist, its index (`.metadata`) and common state unpickle,
  and every shard file the index points into is there and long enough.

The level is one process-wide setting: `hashes` (default), `sizes` (presence and sizes
only: a stat per file, for checkpoints so large that a full read costs too much; see
benchmarks/checkpoint_hashing.py for the cost), chosen by `run.verify_checkpoints` in a
job and `--verify` in the tools. A checkpoint verified once is not hashed again in the
same process while its files keep their sizes and modification times (the trainer and
the tools read common state, then weights).

Under a process group `verify_checkpoint` is collective: rank 0 makes the checks that read
no data (and the legacy checks), every rank hashes its share of the files (manifest.py),
and every rank returns or raises the same verdict.
"""

from __future__ import annotations

import os
from pathlib import Path

from elastic_megatron.checkpoint.manifest import CheckpointCorrupt, checked_on_rank0, has_manifest, verify_manifest
from elastic_megatron.config.errors import require_choice
from elastic_megatron.config.schema import VERIFY_LEVELS

LEGACY_FILES = ("metadata.json", "common.pt", ".metadata")

_level = os.environ.get("ELASTIC_MEGATRON_VERIFY", "hashes")
_verified: dict[str, tuple] = {}  # checkpoint dir -> its files' (name, size, mtime) when verified


def set_level(level: str) -> None:
    require_choice("run.verify_checkpoints", level, VERIFY_LEVELS)
    global _level
    _level = level


def level() -> str:
    return _level


def check_shard_files(directory: Path, metadata) -> None:
    """Every shard file a dist checkpoint's index points into exists and is long enough."""
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = directory / name
        if not path.exists():
            raise CheckpointCorrupt(path, "missing (the checkpoint index points into it)")
        if path.stat().st_size < size:
            raise CheckpointCorrupt(path, f"truncated: {path.stat().st_size} bytes, the checkpoint index needs {size}")


def _verify_structure(directory: Path) -> None:
    """What can be checked of a checkpoint that has no manifest."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    for name in LEGACY_FILES:
        if not (directory / name).is_file():
            raise CheckpointCorrupt(directory / name, "missing")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as err:
        raise CheckpointCorrupt(directory / ".metadata", f"unreadable ({type(err).__name__}: {err})") from None
    check_shard_files(directory, metadata)
    try:
        dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as err:
        raise CheckpointCorrupt(directory / "common.pt", f"unreadable ({type(err).__name__}: {err})") from None


def verify_checkpoint(directory: str | Path) -> bool:
    """Raise CheckpointCorrupt unless the checkpoint directory `directory` (an iter_*
    dir) is whole; True if it was checked against a manifest, False for a legacy one.
    Collective under a process group: call on every rank."""
    directory = Path(directory)
    key = str(directory.resolve())
    stamp: list = []  # rank 0's stamp of the files before they are hashed

    def kind() -> str:
        if has_manifest(directory):
            stamp.append(_stamp(directory))
            return "verified before" if _verified.get(key) == (_level, stamp[0]) else "manifest"
        if not directory.is_dir():
            raise CheckpointCorrupt(directory, "not a directory")
        _verify_structure(directory)
        return "legacy"

    found = checked_on_rank0(kind)
    if found == "legacy":
        return False
    if found == "manifest":
        verify_manifest(directory, check_hashes=_level == "hashes", collective=True)
        if stamp:
            _verified[key] = (_level, stamp[0])
    return True


def _stamp(directory: Path) -> tuple:
    """Name, size and modification time of every file (a stat each): any rewrite shows."""
    return tuple(sorted((str(p.relative_to(directory)), st.st_size, st.st_mtime_ns)
                        for p in directory.rglob("*") if (st := p.stat()) and p.is_file()))
