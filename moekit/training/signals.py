"""Graceful stop of a training run: Ctrl-C (SIGINT) or SIGTERM ends the loop after the current step with a
checkpoint, the summary and the plots (docs/reliability.md)."""

from __future__ import annotations

import signal
import threading

__all__ = ["StopFlag"]


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, checkpoint, write the summary
    and plots; a second signal interrupts at once (the previous complete checkpoint is still there)."""

    SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self) -> None:
        self.requested = False
        self.by: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.by = True, signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
