"""What runs in every task of a Slurm job that fmtrain submitted (``launch.slurm``): the spec's entry
point on this task's ranks, and, on rank 0 at the end, the record of how the job ended.

A task that is one rank runs the entry point in its own process; one task per node with several
ranks (``launcher.procs_per_task``) starts them under torch's elastic agent. A stop by USR2 (the
time-limit warning, or a preemption) is recorded in ``requeues.jsonl`` and the job is requeued, up
to ``launcher.max_requeues`` times.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.spec import RESULT_FILE, Entrypoint, JobRecord, now, run_outcome

REQUEUES = "requeues.jsonl"


@dataclass
class SlurmTask:
    """What every Slurm task of a job runs (pickled by submitit at submission)."""

    config_path: str
    entry: Entrypoint
    time_min: int
    signal_delay_s: int
    max_requeues: int
    procs_per_task: int = 1

    def __call__(self) -> dict[str, Any]:
        from fmtrain.signals import catch_early

        catch_early()  # a time-limit warning during start-up stops the run at its first step, saved
        from fmtrain import config
        from launch.env import slurm_job, torch_env_from_slurm

        started = time.time()
        os.environ.update(torch_env_from_slurm(os.environ))
        job = slurm_job(os.environ)
        cfg = config.load(self.config_path)
        run_dir = Path(cfg.run_dir)
        rank = int(os.environ["RANK"])  # with procs_per_task > 1: this node's rank
        print(
            f"fmtrain task {rank} of {os.environ['WORLD_SIZE']}, job {job['display_id']}, on {socket.gethostname()}", flush=True
        )
        if rank == 0:
            from fmtrain import watchdog

            watchdog.ON_HANG.append(lambda message: _update_record(run_dir, state="failed", ended=now(), message=message))
            earlier = int(JobRecord.read(run_dir).extra.get("attempts_before", 0))  # runs before this submission
            attempts = earlier + int(job["restarts"]) + 1
            _update_record(run_dir, state="running", attempts=attempts, code=str(Path(__file__).parent.parent))
            (run_dir / RESULT_FILE).unlink(missing_ok=True)  # the entry point's rank 0 writes it anew
        try:
            if self.procs_per_task > 1:
                self._run_node(job)
            else:
                self.entry.call()
        except BaseException as error:
            if rank == 0:
                _update_record(run_dir, state="failed", ended=now(), message=f"{type(error).__name__}: {error}")
            raise
        # The run is over: a time-limit warning has nothing left to save, and one landing while the
        # interpreter shuts down (which puts Python-set handlers back to the default: terminate) would
        # fail a finished job (seen in CI: USR2 during the exit after the last step).
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if rank != 0:
            return {}
        outcome = run_outcome(run_dir)
        self._finish(run_dir, outcome, job, time.time() - started)
        return outcome

    def _run_node(self, job: dict[str, Any]) -> None:
        """One task per node: start this node's ranks under torch's elastic agent, static rendezvous
        at the first node. Slurm signals every process of the step, so the ranks see USR2 and
        SIGTERM themselves; the agent ignores USR2 and waits for them to save and return."""
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        nodes, node_rank = int(job["nodes"]), int(job["node_rank"])
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        os.environ["FMTRAIN_DIE_WITH_PARENT"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.procs_per_task)))
        launch_config = LaunchConfig(
            min_nodes=nodes,
            max_nodes=nodes,
            nproc_per_node=self.procs_per_task,
            run_id=f"slurm-{job['job_id']}",
            rdzv_backend="static",
            rdzv_endpoint=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rdzv_configs={"rank": node_rank},
            max_restarts=0,
            monitor_interval=0.1,
        )
        elastic_launch(launch_config, sys.executable)(*self.entry.process_args())

    def _finish(self, run_dir: Path, result: dict[str, Any], job: dict[str, Any], elapsed: float) -> None:
        if result["status"] != "stopped" or result["stop_signal"] != "SIGUSR2":
            state = "completed" if result["status"] == "completed" else "stopped"
            message = "" if state == "completed" else f"stopped by {result['stop_signal']}"
            _update_record(run_dir, state=state, ended=now(), message=message)
            return
        # USR2: Slurm's warning before the time limit, or a preemption (scancel --signal=USR2).
        limit = self.time_min * 60
        reason = "time_limit" if elapsed >= limit - self.signal_delay_s - 30 else "preemption"
        requeue = job["restarts"] < self.max_requeues
        event = {
            "time": now(),
            "job_id": job["display_id"],
            "restart": job["restarts"],
            "reason": reason,
            "step": result["step"],
            "elapsed_s": round(elapsed, 1),
            "requeued": requeue,
        }
        with open(run_dir / REQUEUES, "a") as f:
            f.write(json.dumps(event) + "\n")
        if not requeue:
            message = (
                f"{reason} after {job['restarts']} requeue(s) (launcher.max_requeues={self.max_requeues}): "
                f"saved step {result['step']}"
            )
            _update_record(run_dir, state="stopped", ended=now(), message=message)
            return
        _update_record(run_dir, state="requeued", message=f"{reason}: saved step {result['step']}, requeued")
        subprocess.run(["scontrol", "requeue", str(job["job_id"])], check=True, timeout=60)


def _update_record(run_dir: Path, **changes: Any) -> None:
    record = JobRecord.read(run_dir)
    for key, value in changes.items():
        if key in JobRecord.__dataclass_fields__:
            setattr(record, key, value)
        else:
            record.extra[key] = value
    record.write(run_dir)
