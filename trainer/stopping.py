"""Ending a run early on purpose: Ctrl-C or SIGTERM (a preempted node) becomes a checkpoint and a clean exit."""
from __future__ import annotations

import signal


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop reads at the next step boundary.

    A second Ctrl-C gives up waiting and interrupts at once.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
