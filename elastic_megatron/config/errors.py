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


def require_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "must be a positive integer")


def require_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"allowed: {list(allowed)}")
