"""A launched rank: fmtrain's training run, or any entry point, as a process of its own.

    python -m fmtrain.worker RUN_DIR/config.yaml       # a rank of a training run
    python -m fmtrain.worker -m MODULE ARGS...         # a rank of any entry point: MODULE.main(ARGS)
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
import os
import re
import signal
import sys
import time
from collections.abc import Callable

from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from fmtrain import config
from fmtrain.distributed import die_with_parent
from fmtrain.trainer import run


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
