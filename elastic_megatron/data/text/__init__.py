"""Public texts shipped inside the package (see SOURCES.md here): the English text the
tests, the demo's task evaluation and the benchmarks read, so nothing needs a download or
a file beside the repository."""

from __future__ import annotations

from pathlib import Path

TEXT_DIR = Path(__file__).resolve().parent
SHIPPED = {"tinyshakespeare": "tinyshakespeare.txt", "wikitext2_valid": "wikitext2_valid.txt"}


def shipped_text(name: str = "tinyshakespeare") -> Path:
    """Path of a shipped text by name (`tinyshakespeare`, `wikitext2_valid`)."""
    if name not in SHIPPED:
        raise KeyError(f"no shipped text {name!r}; shipped: {sorted(SHIPPED)}")
    return TEXT_DIR / SHIPPED[name]
