"""Stop requests: SIGTERM, SIGUSR1 and SIGINT mean "checkpoint at the next round boundary, exit 0".

The handler only records the request. A signal may reach only some ranks (SLURM's ``B:`` signals,
a user's ``kill``), so the engine sums every rank's flag in the round's Allreduce and all ranks
stop at the same boundary. A second SIGINT aborts at once, for an impatient Ctrl-C.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    def __init__(self):
        self.received: str | None = None

    def __bool__(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def install(self) -> StopFlag:
        """Handle the stop signals (main thread only: elsewhere Python cannot, and the run simply
        has no signal handling); :meth:`restore` puts the previous handlers back."""
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def restore(self) -> None:
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
