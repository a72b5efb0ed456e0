"""The Ray launcher: Ray Train workers (``TorchTrainer``, Train V2) each calling the same ``run(cfg)``.

    fmtrain train launcher=ray launcher.num_workers=4                       # a local Ray for this run
    fmtrain train launcher=ray launcher.address=auto launcher.gpus_per_worker=1   # a running cluster

Ray Train starts the workers, sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and creates the process
group (gloo on CPU, nccl with GPUs); each worker then runs fmtrain's training loop unchanged.
Checkpoints are fmtrain's, in the run directory, which every worker must see (one machine, or a
shared filesystem). ``launcher.max_failures`` lets Ray restart a failed worker group; the restarted
workers resume from the newest valid checkpoint, as any fmtrain run does.

The launcher runs in the foreground, like the local one, and refuses a request the cluster's
resources cannot satisfy (more CPUs or GPUs than it has) before starting any worker.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from fmtrain.config import LauncherConfig
from launch.spec import ForegroundJob, JobRecord, RunSpec, command_line, now

log = logging.getLogger("fmtrain.launch")


class RayError(RuntimeError):
    """A request the Ray cluster cannot run: said before any worker starts."""


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is Ray's; the training is fmtrain's."""
    from fmtrain import config
    from fmtrain.trainer import run

    run(config.load(loop_config["config_path"]))


def ray_environment() -> dict[str, str]:
    """Ray settings for processes fmtrain starts: no usage reporting, no implicit auth token file."""
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def check_resources(lc: LauncherConfig, available: dict[str, float]) -> None:
    """Refuse more CPUs or GPUs than the cluster has (Ray would otherwise wait for them forever)."""
    for resource, per_worker in (("CPU", lc.cpus_per_worker), ("GPU", lc.gpus_per_worker)):
        needed = per_worker * lc.num_workers
        if needed > available.get(resource, 0.0):
            raise RayError(
                f"launcher.num_workers={lc.num_workers} is invalid: {lc.num_workers} x {per_worker:g} {resource} = "
                f"{needed:g} {resource}, but the Ray cluster has {available.get(resource, 0.0):g}"
            )


class RayLauncher:
    def launch(self, spec: RunSpec) -> ForegroundJob:
        os.environ.update(ray_environment())
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from fmtrain.plan import make_plan

        lc = spec.config.launcher
        log.info("plan per rank:\n%s", make_plan(spec.config, lc.num_workers).table())
        record = JobRecord(
            launcher="ray",
            state="running",
            command=command_line(spec.argv),
            pid=os.getpid(),
            world_size=lc.num_workers,
            started=now(),
        )
        record.attempts = JobRecord.read(spec.run_dir).attempts + 1 if (spec.run_dir / "job.json").exists() else 1
        record.write(spec.run_dir)
        (spec.run_dir / "result.json").unlink(missing_ok=True)
        started_here = not ray.is_initialized() and lc.address is None
        if not ray.is_initialized():
            options: dict[str, Any] = {"address": lc.address, "logging_level": logging.WARNING, "log_to_driver": False}
            if lc.address is None:
                options |= {"include_dashboard": False, "object_store_memory": lc.object_store_mb * 1024 * 1024}
            ray.init(**options)
        try:
            check_resources(lc, ray.cluster_resources())
            record.job_id = ray.get_runtime_context().get_job_id()
            record.write(spec.run_dir)
            use_gpu = lc.gpus_per_worker > 0
            resources = {"CPU": lc.cpus_per_worker} | ({"GPU": lc.gpus_per_worker} if use_gpu else {})
            trainer = TorchTrainer(
                _worker_loop,
                train_loop_config={"config_path": str(spec.config_path)},
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
                run_config=RunConfig(
                    name="train",
                    storage_path=str(spec.run_dir.resolve() / "ray"),
                    failure_config=FailureConfig(max_failures=lc.max_failures),
                ),
            )
            try:
                trainer.fit()
            except Exception as error:  # Ray wraps the worker's exception (WorkerGroupError, TrainingFailedError)
                record.state, record.exit_code, record.message = "failed", 1, f"{type(error).__name__}: {error}"
            else:
                result = json.loads((spec.run_dir / "result.json").read_text())
                record.state, record.exit_code = result["status"], 0
        except RayError as error:
            record.state, record.exit_code, record.message = "failed", 2, str(error)
        finally:
            if started_here:
                ray.shutdown()
        record.ended = now()
        record.write(spec.run_dir)
        return ForegroundJob(spec.run_dir)
