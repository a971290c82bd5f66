"""Graceful SIGINT/SIGTERM: the first signal sets a flag the training loop checks between steps; a second one
stops at once."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from nnctl.reporting import console


class SignalFlag:
    """Context manager installing the handlers; `received` is the first signal's number (or None)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalFlag":
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            return self
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._previous:
            signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        console.print(f"\n{signal.Signals(signum).name} received: finishing this step and saving last.pt "
                      "(send again to stop at once)")
