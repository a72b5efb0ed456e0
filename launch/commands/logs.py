"""``fmtrain logs RUN_DIR|JOB_ID [-f] [--rank R]``: a run's log, followed until the job ends with ``-f``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from launch.commands import run_dir_of


def main(args: list[str]) -> int:
    """``fmtrain logs RUN_DIR|JOB_ID [-f] [--rank R]``: rank R's log (and its scheduler output for Slurm);
    for a Ray Jobs submission without ``--rank``, the job driver's log as the Jobs API keeps it."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="fmtrain logs")
    parser.add_argument("run_dir")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    parser.add_argument("--rank", type=int, default=None)
    try:
        options = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    run_dir = run_dir_of([options.run_dir], "fmtrain logs RUN_DIR|JOB_ID [-f] [--rank R]")
    from launch.ray import TERMINAL_JOB_STATES, RayJob

    visible = (run_dir / "job.json").is_file()
    ray_job = RayJob.of(run_dir) if visible else RayJob(run_dir, options.run_dir, os.environ["RAY_ADDRESS"])
    if ray_job is not None and options.rank is None:
        printed = 0
        while True:
            done = ray_job.scheduler_state() in TERMINAL_JOB_STATES  # read before the log: nothing is missed
            text = ray_job.driver_log()
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
            if done or not options.follow:
                return 0
            time.sleep(1.0)
    from launch.launchers import handle_for

    handle, rank = handle_for(run_dir), options.rank or 0
    offsets: dict[Path, int] = {}

    def dump() -> None:
        for file in handle.logs(rank):
            with open(file, errors="replace") as f:
                f.seek(offsets.get(file, 0))
                text = f.read()
                offsets[file] = f.tell()
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()

    dump()
    while options.follow and handle.running():
        time.sleep(1.0)
        dump()
    if options.follow:
        dump()
    return 0
