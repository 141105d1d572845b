"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs this project has them, so demos and tests need no download.
Files are read in sorted order (deterministic across machines with the same Python);
`elastic_megatron.data.indexed` cuts them into documents and tokenises them.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the preprocessing tool needs none
    import torch


def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def unigram_entropy_nats(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy of the empirical token distribution: the loss of the best context-free model."""
    import torch

    counts = torch.bincount(tokens.long().flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
