"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs this project has them, so demos and tests need no download.
Files are read in sorted order (deterministic across machines with the same Python) and
tokenised as raw UTF-8 bytes (vocabulary 256).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def stdlib_bytes(max_bytes: int) -> torch.Tensor:
    """Up to `max_bytes` bytes of standard-library source as a uint8 tensor."""
    chunks, total = [], 0
    for path in stdlib_source_files():
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError("no Python standard library sources found (sysconfig stdlib path)")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).clone()


def unigram_entropy_nats(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy of the empirical token distribution: the loss of the best context-free model."""
    counts = torch.bincount(tokens.long().flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
