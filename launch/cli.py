"""The ``fmtrain`` command.

    fmtrain train [OVERRIDES...]                 train (local launcher by default)
    fmtrain train -m optim.lr=1e-3,3e-4          one run per value (Hydra multirun)
    fmtrain train --cfg job [OVERRIDES...]       print the composed config and exit
    fmtrain train launcher=slurm ... [--dry-run] submit to Slurm (--dry-run: print the sbatch script)
    fmtrain train launcher=ray launcher.submit=jobs launcher.address=http://HEAD:8265   Ray Jobs API
    fmtrain status RUN_DIR|JOB_ID                state, steps done and last loss of a run
    fmtrain logs RUN_DIR|JOB_ID [-f] [--rank R]  a run's log (-f: follow until the job ends)
    fmtrain cancel RUN_DIR|JOB_ID                stop a running or queued job

A JOB_ID is a Ray Jobs submission id, looked up on the cluster at $RAY_ADDRESS (its dashboard URL).
    fmtrain plan model=8b strategy=fsdp world_size=64   per-rank memory of a plan, nothing allocated
    fmtrain tokenizer train data=jsonl data.paths=[c.jsonl] tokenizer.vocab_size=8192 out=tok   a BPE tokenizer

Every override is checked (for a sweep: every combination) before anything starts. A refused command
line prints one message naming the field, the value and the valid choices, and exits with code 2.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time

from launch.commands import usage
from launch.compose import UsageError

COMMANDS = ("train", "tune", "status", "logs", "cancel", "plan", "export", "tokenizer")  # each a module of launch.commands


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("FMTRAIN_INVOKED_AT", repr(time.time()))  # submit-to-first-step latency
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from fmtrain import __version__

        print(f"fmtrain {__version__}")
        return 0
    try:
        if argv[0] not in COMMANDS:
            raise UsageError(f"unknown command {argv[0]!r}; valid commands are {', '.join(COMMANDS)}")
        return int(importlib.import_module(f"launch.commands.{argv[0]}").main(argv[1:]))
    except UsageError as error:
        print(f"fmtrain: error: {error}", file=sys.stderr)
        return 2


def importable_here() -> None:
    """The current directory on ``sys.path``, as ``python -m`` has it, for this process and every
    process it starts (the ranks): ``imports=[my_models]`` and ``model.target=my_models.gpt.build``
    find the user's own modules where the command runs."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, paths)])


def entry() -> None:
    importable_here()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (fmtrain --help | head): not an error of ours. Python's own recipe:
        # point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    gc.freeze()  # skip the interpreter's final collection over torch's heap (~0.3 s); all is closed
    sys.exit(code)
