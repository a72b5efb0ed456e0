"""Hang detection in every rank: a thread that ends the job when the run stops making progress.

    dog = Watchdog(run_dir / "logs", rank, world_size, timeout_s=cfg.trainer.hang_timeout_s)
    dog.mark(step, "train")        # the loop says where it is: two assignments, nothing else
    dog.stop()

A rank whose loop has not moved for ``trainer.hang_timeout_s`` (a step, an evaluation or a save that
never ends: a peer stuck before a collective, a deadlock, a dead file system) writes every thread's
Python stack to ``logs/rank<R>.stack.txt``, names the ranks that did not arrive where the others
are (from each rank's ``logs/heartbeat/rank<R>.json``, written by this thread when the rank moves),
and exits non-zero. Every rank's watchdog fires within a second of the others, so each one's stack
is written; the launcher then ends the job and shows the message (a Slurm job fails, a Ray worker
group is restarted from the newest checkpoint). The process group's own timeout (gloo, nccl) is set
a little longer, so a rank waiting in a collective is reported by this, not by a bare timeout.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fmtrain")

PHASES = ("start", "train", "evaluate", "checkpoint")  # the order a step goes through
EXIT_CODE = 124  # as timeout(1) exits
# Called with the message before the process exits (a Slurm task records it in job.json).
ON_HANG: list[Callable[[str], None]] = []


class HangError(RuntimeError):
    """A rank made no progress for ``trainer.hang_timeout_s``."""


class Watchdog:
    """Watches one rank's loop from a daemon thread; ``mark`` is all the loop does."""

    def __init__(self, log_dir: Path, rank: int, world_size: int, timeout_s: float, poll_s: float = 1.0) -> None:
        self.log_dir, self.rank, self.world_size = log_dir, rank, world_size
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.state = (0, "start", time.monotonic())  # step, phase, since: replaced whole, read whole
        self.heartbeats = log_dir / "heartbeat"
        self.heartbeats.mkdir(parents=True, exist_ok=True)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fmtrain-watchdog", daemon=True)
        if timeout_s > 0:  # 0: no watchdog (trainer.hang_timeout_s=0)
            self._thread.start()

    def mark(self, step: int, phase: str) -> None:
        self.state = (step, phase, time.monotonic())

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.poll_s)

    def _watch(self) -> None:
        written: tuple[int, str] | None = None
        while not self._stopped.wait(self.poll_s):
            step, phase, since = self.state
            if (step, phase) != written:
                _write_json(self.heartbeats / f"rank{self.rank}.json", {"step": step, "phase": phase, "time": time.time()})
                written = (step, phase)
            stalled = time.monotonic() - since
            if stalled > self.timeout_s and not self._stopped.is_set():
                self._fire(step, phase, stalled)

    def _fire(self, step: int, phase: str, stalled: float) -> None:
        with open(self.log_dir / f"rank{self.rank}.stack.txt", "w") as f:
            faulthandler.dump_traceback(f, all_threads=True)
        message = (
            f"rank {self.rank} made no progress for {stalled:.0f} s (trainer.hang_timeout_s={self.timeout_s:g}) "
            f"at step {step} ({phase}); {who_is_behind(self.heartbeats, self.world_size)}; "
            f"Python stacks: {self.log_dir}/rank*.stack.txt"
        )
        log.error("%s", message)
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(HangError(message))  # what the launcher shows
        for callback in ON_HANG:
            try:
                callback(message)
            except Exception:  # the exit below matters more
                log.exception("a hang callback failed")
        for handler in logging.getLogger("fmtrain").handlers:
            handler.flush()
        time.sleep(2 * self.poll_s)  # the other ranks' watchdogs fire too: let them write their stacks
        os._exit(EXIT_CODE)  # the main thread is stuck: no unwinding to wait for


def who_is_behind(heartbeats: Path, world_size: int) -> str:
    """Which ranks did not arrive where the furthest rank is (step, then phase), from their heartbeats."""
    seen: dict[int, tuple[int, int]] = {}
    for rank in range(world_size):
        try:
            beat = json.loads((heartbeats / f"rank{rank}.json").read_text())
            seen[rank] = (int(beat["step"]), PHASES.index(beat["phase"]))
        except (OSError, ValueError, KeyError):
            continue
    silent = sorted(set(range(world_size)) - set(seen))
    furthest = max(seen.values(), default=(0, 0))
    behind = sorted(rank for rank, at in seen.items() if at < furthest)
    parts = []
    if behind:
        where = ", ".join(f"rank {r} at step {seen[r][0]} ({PHASES[seen[r][1]]})" for r in behind)
        parts.append(f"did not arrive at step {furthest[0]} ({PHASES[furthest[1]]}): {where}")
    if silent:
        parts.append(f"no heartbeat from rank(s) {', '.join(map(str, silent))}")
    return "; ".join(parts) or f"every rank is at step {furthest[0]} ({PHASES[furthest[1]]})"


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
