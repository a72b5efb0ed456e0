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

A thread cannot watch an interpreter that no thread can run in: a C call that never releases the
GIL, a stopped process. So each rank also starts a sidecar process (``python -m fmtrain.watchdog``,
no torch, a few MB) that the watchdog thread ticks through a pipe every ``poll_s``. When the ticks
stop for the timeout plus a grace period, the sidecar has the rank's own C-level signal handler
(faulthandler, which needs no GIL) write every thread's stack, records the hang as the rank's error
(the launcher's report), and SIGKILLs the rank. The sidecar ends with the rank (the pipe closes).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fmtrain")

PHASES = ("start", "train", "evaluate", "checkpoint")  # the order a step goes through
EXIT_CODE = 124  # as timeout(1) exits
DUMP_SIGNAL = signal.SIGURG  # the sidecar's "write your stacks": ignored by default, used by nothing here
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
        self._sidecar: subprocess.Popen[bytes] | None = None
        if timeout_s > 0:  # 0: no watchdog (trainer.hang_timeout_s=0)
            self._stacks = open(self.stack_file, "w")  # noqa: SIM115  (faulthandler writes here until stop())
            faulthandler.register(DUMP_SIGNAL, file=self._stacks, all_threads=True, chain=False)
            args = (os.getpid(), log_dir, rank, world_size, timeout_s + sidecar_grace(poll_s), poll_s)
            self._sidecar = subprocess.Popen(
                [sys.executable, "-m", "fmtrain.watchdog", *map(str, args)],
                stdin=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in the terminal is the rank's to handle, not the sidecar's
            )
            os.set_blocking(self._sidecar.stdin.fileno(), False)  # type: ignore[union-attr]  # a tick never blocks
            self._thread.start()

    @property
    def stack_file(self) -> Path:
        return self.log_dir / f"rank{self.rank}.stack.txt"

    def mark(self, step: int, phase: str) -> None:
        self.state = (step, phase, time.monotonic())

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.poll_s)
        if self._sidecar is not None:
            self._sidecar.stdin.close()  # type: ignore[union-attr]  # EOF: the sidecar exits
            self._sidecar.wait(timeout=10)
            self._sidecar = None
            faulthandler.unregister(DUMP_SIGNAL)
            self._stacks.close()
            if self.stack_file.stat().st_size == 0:
                self.stack_file.unlink()

    def _watch(self) -> None:
        written: tuple[int, str] | None = None
        while not self._stopped.wait(self.poll_s):
            with contextlib.suppress(OSError, AttributeError):  # the sidecar is gone: nothing to tell it
                os.write(self._sidecar.stdin.fileno(), b".")  # type: ignore[union-attr]  # alive
            step, phase, since = self.state
            if (step, phase) != written:
                _write_json(self.heartbeats / f"rank{self.rank}.json", {"step": step, "phase": phase, "time": time.time()})
                written = (step, phase)
            stalled = time.monotonic() - since
            if stalled > self.timeout_s and not self._stopped.is_set():
                self._fire(step, phase, stalled)

    def _fire(self, step: int, phase: str, stalled: float) -> None:
        with open(self.stack_file, "w") as f:
            faulthandler.dump_traceback(f, all_threads=True)
        message = (
            f"rank {self.rank} made no progress for {stalled:.0f} s (trainer.hang_timeout_s={self.timeout_s:g}) "
            f"at step {step} ({phase}); {who_is_behind(self.heartbeats, self.world_size)}; "
            f"Python stacks: {self.log_dir}/rank*.stack.txt"
        )
        log.error("%s", message)
        record_hang(message)
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


def record_hang(message: str) -> None:
    """Write the hang as this rank's error, in torch elastic's error-file format: what the launcher shows."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        extra = {"py_callstack": "", "timestamp": str(int(time.time()))}
        _write_json(Path(path), {"message": {"message": f"{HangError.__name__}: {message}", "extraInfo": extra}})


def sidecar_grace(poll_s: float) -> float:
    """How much longer than the timeout the sidecar waits: the watchdog thread, if it can run, goes first."""
    return 5 + 5 * poll_s


def sidecar(pid: int, log_dir: Path, rank: int, world_size: int, timeout_s: float, poll_s: float) -> int:
    """Watch rank ``pid`` from outside: no tick on stdin for ``timeout_s`` means its interpreter is stuck.

    Then: its stacks (``DUMP_SIGNAL``: faulthandler's handler runs without the GIL), its error, SIGKILL.
    EOF on stdin (the rank stopped the watchdog, or died) ends the sidecar quietly.
    """
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):  # the rank's to act on (a
        signal.signal(stop, signal.SIG_IGN)  # Slurm time-limit warning reaches every process): it ends, then this
    last = time.monotonic()
    while (waited := time.monotonic() - last) < timeout_s:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], timeout_s - waited)
        if ready:
            if not os.read(sys.stdin.fileno(), 4096):
                return 0
            last = time.monotonic()
    message = (
        f"rank {rank} (pid {pid}) stopped running Python for {waited:.0f} s (a call that holds the GIL, or a "
        f"stopped process; trainer.hang_timeout_s={timeout_s - sidecar_grace(poll_s):g}): killed; "
        f"{who_is_behind(log_dir / 'heartbeat', world_size)}; Python stacks: {log_dir}/rank*.stack.txt"
    )
    print(f"fmtrain watchdog: {message}", file=sys.stderr, flush=True)
    try:
        os.kill(pid, DUMP_SIGNAL)
        time.sleep(2)  # faulthandler writes at once, unless the process is stopped (SIGSTOP): then never
        record_hang(message)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended meanwhile
        return 0
    return EXIT_CODE


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


if __name__ == "__main__":  # the sidecar: python -m fmtrain.watchdog PID LOG_DIR RANK WORLD_SIZE TIMEOUT_S POLL_S
    _pid, _log_dir, _rank, _world, _timeout, _poll = sys.argv[1:]
    sys.exit(sidecar(int(_pid), Path(_log_dir), int(_rank), int(_world), float(_timeout), float(_poll)))
