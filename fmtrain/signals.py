"""Stop signals: the handler only sets a flag; the training loop acts on it at a step boundary.

    stop = StopFlag()          # SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (Slurm's warning before a time limit)
    ...
    if stop.signum: ...        # the trainer sums it over ranks with the step's loss: all stop together

Saving and collectives are unsafe inside a signal handler, so nothing else happens there.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


_early: list[int] = []  # stop signals that arrived before the run's StopFlag existed


def catch_early() -> None:
    """Record stop signals from a process's first moments, before the run's :class:`StopFlag` exists.

    A Slurm task spends seconds importing torch and building the model; a time-limit warning (USR2)
    that lands then would reach submitit's handler, which ends the job unrequeued. Recorded here,
    it stops the run at its first step boundary instead: saved, then requeued like any other.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _record_early)


def _record_early(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)


class StopFlag:
    """Records the first stop signal; the handler does nothing else (no I/O, no collectives)."""

    def __init__(self) -> None:
        self.signum = _early[0] if _early else 0  # one that came during start-up (catch_early)
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. a Ray Train worker's loop thread: the host process owns the signals
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
