"""``fmtrain cancel RUN_DIR|JOB_ID``: stop a running or queued job (Slurm: scancel; local: SIGTERM, it saves first)."""

from __future__ import annotations

import os

from launch.commands import run_dir_of


def main(args: list[str]) -> int:
    from launch.launchers import handle_for
    from launch.ray import RayJob
    from launch.spec import JobRecord

    run_dir = run_dir_of(args, "fmtrain cancel RUN_DIR|JOB_ID")
    if not (run_dir / "job.json").is_file():  # a Ray job whose run directory this machine cannot see
        RayJob(run_dir, args[0], os.environ["RAY_ADDRESS"]).cancel()
        print(f"cancelled ray job {args[0]}")
        return 0
    record = JobRecord.read(run_dir)
    handle_for(run_dir).cancel()
    print(f"cancelled {record.launcher} job {record.job_id}: {run_dir}")
    return 0
