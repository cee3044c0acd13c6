"""Catching SIGINT/SIGTERM so that a run stops between chunks with a checkpoint. Standard library
only, so that the CLI can install it before importing JAX: a signal during start-up is not lost."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

_ACTIVE: list[StopFlag] = []


def active() -> StopFlag | None:
    """The innermost installed ``StopFlag`` (the ``jmaml`` command installs one before importing JAX),
    or None: the engine's loop honours it, else installs its own for the run."""
    return _ACTIVE[-1] if _ACTIVE else None


class StopFlag:
    """Catches SIGINT/SIGTERM while installed; the loop checks it between chunks."""

    def __init__(self):
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        _ACTIVE.append(self)
        return self

    def reinstall(self) -> None:
        """Takes SIGINT/SIGTERM back after a library installed its own handlers at the C level (JAX's
        distributed runtime watches SIGTERM for preemption)."""
        if self._previous:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is not None:
            if signum == self.signum and now - self._at < 2.0:
                return  # the same request twice (the process group and a supervising parent)
            raise KeyboardInterrupt  # a second request: stop now
        self.signum, self._at = signum, now

    def __exit__(self, *exc):
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        return False
