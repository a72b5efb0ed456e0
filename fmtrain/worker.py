"""A launched rank: fmtrain's training run, or any entry point, as a process of its own.

    python -m fmtrain.worker RUN_DIR/config.yaml       # a rank of a training run
    python -m fmtrain.worker -m MODULE ARGS...         # a rank of any entry point: MODULE.main(ARGS)
    forked(*ARGS)                                      # either, in a process forked from the local launcher
    main([config_path])                                # a training rank in-process (Ray worker, Slurm task)

A launcher starts this once per rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
set (``launch.spec.Entrypoint``). ``@record`` writes an uncaught exception to the error file the
elastic agent gave this process, so the launcher shows the failing rank's own traceback; a user
error (``ConfigError``) is one line and exit 2; the process dies with its agent.

For tests of launchers, ``FMTRAIN_FAULT=RANK:STEP`` makes that rank raise at that step, and
``RANK:STEP:hang`` makes it hang there, ``RANK:STEP:gil`` hang holding the GIL (no thread of the
process runs again), ``RANK:STEP:kill`` SIGKILL itself (the hook is here, at the boundary, not in the
training loop).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable

from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from fmtrain import config
from fmtrain.distributed import die_with_parent
from fmtrain.trainer import run


def preload() -> None:
    """Import, in a launcher's process before it forks its ranks, what each rank would otherwise import on its
    own: ``torch._dynamo``, which ``torch.optim.Optimizer``'s constructor imports (~1.4 CPU-s a process)."""
    import torch._dynamo  # noqa: F401


def injected_fault() -> Callable[[int], None] | None:
    """``FMTRAIN_FAULT=RANK:STEP``: a step hook that raises in that rank at that step;
    ``RANK:STEP:hang``: one that never returns there (the watchdog's test); ``RANK:STEP:gil``: one that
    never returns and never lets another thread run (the sidecar's test); ``RANK:STEP:kill``: SIGKILL.
    ``FMTRAIN_STEP_DELAY_S=S``: every step of every rank takes S seconds longer (a run whose length
    does not depend on the machine's speed: the time-limit test)."""
    spec = os.environ.get("FMTRAIN_FAULT", "")
    delay = float(os.environ.get("FMTRAIN_STEP_DELAY_S", "0") or 0)
    if not spec and not delay:
        return None
    fault_rank, fault_step, *kind = spec.split(":") if spec else ("-1", "-1")
    rank = int(os.environ.get("RANK", "0"))

    def fault(step: int) -> None:
        time.sleep(delay)
        if rank == int(fault_rank) and step == int(fault_step):
            if kind == ["hang"]:
                while True:
                    time.sleep(3600)
            if kind == ["gil"]:  # a regular expression's backtracking holds the GIL: 2**64 steps
                re.fullmatch(r"(a+)+b", "a" * 64)
            if kind == ["kill"]:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault (FMTRAIN_FAULT) in rank {rank} at step {step}")

    return fault


def main(argv: list[str]) -> int:
    """Train the run of config ``argv[0]``; errors are raised (the in-process entry point)."""
    if len(argv) != 1:
        raise config.ConfigError("argv", argv, "one argument: the run's config.yaml")
    run(config.load(argv[0]), on_step=injected_fault())
    return 0


@record
def process_main(argv: list[str]) -> int:
    """``python -m fmtrain.worker CONFIG_YAML`` or ``-m MODULE ARGS...``: one rank as a process of its own."""
    return rank_main(argv)


def forked(*argv: str) -> None:
    """One rank forked from the local launcher's process (``launcher.start=fork``; torch's elastic agent calls
    this in the child, its error file recorded as ``@record`` does): the state a fresh ``python -u -m
    fmtrain.worker ARGV`` starts with, then the same work, without the seconds a fresh interpreter spends
    importing torch. A non-zero exit code ends the process with that code, as it would end the interpreter."""
    fresh_process_state()
    sys.argv = [__file__, *argv]  # as python -m fmtrain.worker ARGV has it
    try:
        code = rank_main(list(argv))
    except Exception as error:  # as an interpreter would: the traceback on stderr, exit code 1
        traceback.print_exc()
        get_error_handler().record_exception(error)
        record_pid()
        code = 1
    if code:
        raise SystemExit(code)


def record_pid() -> None:
    """Add this process's pid to the error file just written: torch's agent reports one ended process of a
    forked group, perhaps a peer that only saw this one go; the launcher finds this one by its file
    (``launch.local.first_failure``)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        data["message"]["extraInfo"]["pid"] = str(os.getpid())
        with open(path, "w") as f:
            json.dump(data, f)


def fresh_process_state() -> None:
    """Undo what a forked rank inherits from its launcher and a new interpreter would not have: the agent's
    signal handlers (a SIGTERM must reach the run's own handler, not raise the agent's exception), the
    command's log handlers, buffered output (``python -u``), and the OpenMP thread count the launcher's
    process read at ``import torch``, before the launcher set OMP_NUM_THREADS for its ranks."""
    import io
    import logging

    import torch

    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)
    if threads := os.environ.get("OMP_NUM_THREADS", "").strip():
        torch.set_num_threads(int(threads))


def rank_main(argv: list[str]) -> int:
    """What a rank process runs, however it started: the training run of a config, or ``-m MODULE ARGS``."""
    if len(argv) >= 2 and argv[0] == "-m":
        entry: Callable[[list[str]], int] = importlib.import_module(argv[1]).main
        args = argv[2:]
    elif len(argv) == 1 and argv[0] != "-m":
        entry, args = main, argv
    else:
        print("usage: python -m fmtrain.worker CONFIG_YAML | -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    if os.environ.get("FMTRAIN_DIE_WITH_PARENT") == "1":
        die_with_parent()
    try:
        code = entry(args)
    except config.ConfigError as error:  # a user error this rank found (its device): one line, no traceback
        get_error_handler().record_exception(error)  # the launcher reports the failing rank's message
        print(f"fmtrain: error: {error}", file=sys.stderr)
        return 2
    # Everything is written and closed. The interpreter's last garbage collection over the heap
    # of torch, matplotlib and tensorboard takes ~0.5 s; frozen objects are skipped by it.
    gc.freeze()
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(process_main(sys.argv[1:]))
