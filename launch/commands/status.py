"""``fmtrain status RUN_DIR|JOB_ID``: a run's state, steps done and last losses, as JSON."""

from __future__ import annotations

import json
import os

from launch.commands import run_dir_of


def main(args: list[str]) -> int:
    from fmtrain.metrics import read_jsonl
    from launch.launchers import handle_for
    from launch.spec import JobRecord

    run_dir = run_dir_of(args, "fmtrain status RUN_DIR|JOB_ID")
    if not (run_dir / "job.json").is_file():  # a Ray job whose run directory this machine cannot see
        return _print_remote_ray_job(args[0])
    record = JobRecord.read(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    summary = {
        "run_dir": str(run_dir),
        "launcher": record.launcher,
        "state": record.state,
        "job_id": record.job_id,
        "attempts": record.attempts,
        "step": train_records[-1]["step"] if train_records else 0,
        "loss": train_records[-1]["loss"] if train_records else None,
        "val_loss": val_records[-1]["val_loss"] if val_records else None,
        "started": record.started,
        "ended": record.ended,
        "message": record.message,
    }
    print(json.dumps(summary | handle_for(run_dir).details(), indent=1))
    return 0


def _print_remote_ray_job(submission_id: str) -> int:
    from launch.ray import JOB_STATES, find_submission

    info = find_submission(os.environ["RAY_ADDRESS"], submission_id)
    summary = {
        "job_id": submission_id,
        "launcher": "ray",
        "state": JOB_STATES[str(info.status.value)],
        "scheduler_state": str(info.status.value),
        "run_dir": (info.metadata or {}).get("run_dir", ""),
        "message": info.message or "",
    }
    print(json.dumps(summary, indent=1))
    return 0
