"""Graceful stop on SIGTERM / SIGUSR1 (Slurm preemption, time limit, `scontrol requeue`).

The handler only records the signal; the loop asks `should_stop()` after each step, which
all-reduces the flag so every rank stops after the same step, saves and exits.
"""

from __future__ import annotations

import signal
from typing import Optional

from elastic_megatron.parallel.collectives import any_rank


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        return any_rank(self.received is not None)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "(peer rank)"
