"""Shared bits of the command-line tools in tools/."""

from __future__ import annotations

import sys
from typing import Callable


def run_tool(job: Callable[[], object], done: Callable[[object], str]) -> int:
    """Run `job`; print `done(result)`, or the error of bad input (which names what was
    wrong and what is allowed) on stderr with exit status 2."""
    from elastic_megatron.config.errors import ConfigError

    try:
        result = job()
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(done(result))
    return 0
