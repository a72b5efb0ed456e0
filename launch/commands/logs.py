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
    from launch.spec import JobRecord

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
    rank = options.rank or 0

    def files() -> list[Path]:
        record = JobRecord.read(run_dir)
        found = [run_dir / "logs" / f"rank{rank}.log"]
        if record.launcher == "slurm" and record.job_id:
            folder = Path(record.extra.get("slurm_folder", run_dir / "slurm"))
            found = sorted(folder.glob(f"**/{record.job_id}_{rank}_log.*")) + found
        return [f for f in found if f.is_file()]

    offsets: dict[Path, int] = {}

    def dump() -> None:
        for file in files():
            with open(file, errors="replace") as f:
                f.seek(offsets.get(file, 0))
                text = f.read()
                offsets[file] = f.tell()
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()

    dump()
    while options.follow and _job_running(run_dir):
        time.sleep(1.0)
        dump()
    if options.follow:
        dump()
    return 0


def _job_running(run_dir: Path) -> bool:
    from launch.spec import ForegroundJob, JobRecord

    record = JobRecord.read(run_dir)
    if record.launcher == "slurm":
        from launch.slurm import TERMINAL, scheduler_state

        return scheduler_state(record.job_id) not in TERMINAL
    from launch.ray import RayJob

    ray_job = RayJob.of(run_dir) if record.launcher == "ray" else None
    if ray_job is not None:
        return ray_job.state() in ("pending", "running")
    return ForegroundJob(run_dir).state() == "running"
