"""The one error type for bad configuration.

Every check in this project raises `ConfigError` with the dotted key, the value it got
and what would have been allowed, so a user can fix a Hydra override without reading
the code. Checks run before any tensor is allocated.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid config {key}={value!r}: {allowed}")
