"""Server options and the listening socket: checked before anything heavy is imported or
loaded (a bad option is one line, exit 2, in well under a second)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Optional

from elastic_megatron.config.errors import ConfigError


@dataclass
class ServeOptions:
    max_batch: int = 8  # decode slots per budget
    max_queue: int = 64  # sequences that may wait for a slot beyond the free ones
    max_model_len: Optional[int] = None  # positions per slot (default: the model's max_sequence_length)
    api_key: Optional[str] = None
    grace_period: float = 30.0  # SIGTERM: seconds the requests in flight get to finish

    def check(self, max_sequence_length: Optional[int] = None) -> None:
        """Every option's check; the length limit against the model's once it is known."""
        for key, value, low in (("--max-batch", self.max_batch, 1), ("--max-queue", self.max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(key, value, f"must be an integer >= {low}")
        if self.max_model_len is not None and not 1 < self.max_model_len <= (max_sequence_length or self.max_model_len):
            raise ConfigError("--max-model-len", self.max_model_len,
                              f"must be between 2 and the model's max_sequence_length ({max_sequence_length})")
        if not self.grace_period >= 0:
            raise ConfigError("--grace-period", self.grace_period, "must be >= 0 seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key", "(empty)", "must not be empty")


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket, bound now (a port in use is bad input, exit 2; port 0: any free
    one). It listens at once: connections made before the server runs wait in the backlog."""
    if not 0 <= port <= 65535:
        raise ConfigError("--port", port, "must be between 0 (any free port) and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError("--host", host, f"is not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError("--port", port, f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(backlog)
    return sock


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """The warning for binding an address other machines reach without an API key."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"warning: serving on {host} without --api-key: anyone who reaches this address can use the model "
            "(bind 127.0.0.1, or set --api-key)")
