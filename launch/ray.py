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

``launcher.submit=jobs`` sends the same run through the Ray Jobs API instead and returns at once with
the submission id (``launcher.address`` is then the dashboard's URL):

    fmtrain train launcher=ray launcher.submit=jobs launcher.address=http://head:8265 run_dir=/shared/runs/x
    RAY_ADDRESS=http://head:8265 fmtrain status|logs [-f]|cancel fmtrain-20261122-141500-1a2b3c

The job's entrypoint (``python -m launch.ray config.yaml``, with the resolved config uploaded as its
working directory) runs this launcher in the foreground on the cluster, against ``address=auto``.
The run directory is written by the cluster's processes: put it on storage they share with you to
see metrics and rank logs here; the Jobs API alone gives the state, the driver's log and cancel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtrain.config import LauncherConfig
from launch.spec import (
    RESULT_FILE,
    Entrypoint,
    ForegroundJob,
    ForegroundLauncher,
    JobHandle,
    JobRecord,
    LaunchError,
    RunSpec,
    command_line,
    now,
    rank_logs,
    run_outcome,
)

log = logging.getLogger("fmtrain.launch")


class RayError(LaunchError):
    """A request the Ray cluster cannot run: said before any worker starts."""


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is Ray's; the entry point (fmtrain's training run) is the spec's."""
    Entrypoint(loop_config["module"], tuple(loop_config["args"])).call()


def torch_trainer(
    lc: LauncherConfig,
    entry: Entrypoint,
    storage: Path,
    loop: Callable[[dict[str, Any]], None] = _worker_loop,
    callbacks: tuple[Any, ...] = (),
    timeout_s: float = 1800.0,
) -> Any:
    """Ray Train's ``TorchTrainer`` running ``entry`` on ``launcher.num_workers`` workers (gloo on CPU, nccl on GPUs)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = lc.gpus_per_worker > 0
    resources = {"CPU": lc.cpus_per_worker} | ({"GPU": lc.gpus_per_worker} if use_gpu else {})
    return TorchTrainer(
        loop,
        train_loop_config={"module": entry.module, "args": list(entry.args)},
        # The process group's timeout: a minute past trainer.hang_timeout_s, so fmtrain's watchdog speaks first.
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(timeout_s)),
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name="train",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=lc.max_failures),
            callbacks=list(callbacks),
        ),
    )


# Ray starts the processes of tasks and actors at nice 15 (RAY_worker_niceness), to keep its own daemons
# responsive. fmtrain's ranks, and a sweep's trials with the ranks they start, are the job itself: they run at
# nice 0, as under the local and Slurm launchers, or any other process on the node takes the CPU before them
# (at nice 15 a rank gets 1/28 of a nice-0 process's share of a busy core). Ray Jobs does the same for its drivers.
JOB_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def init_options(address: str | None, object_store_mb: int) -> dict[str, Any]:
    """``ray.init``'s arguments for a run or a sweep: quiet, processes at nice 0, and a Ray started here
    (no ``address``) without a dashboard and with a small object store (fmtrain moves no data through it)."""
    options: dict[str, Any] = {"address": address, "logging_level": logging.WARNING, "log_to_driver": False}
    options["runtime_env"] = JOB_RUNTIME_ENV
    if address is None:
        options |= {"include_dashboard": False, "object_store_memory": object_store_mb * 1024 * 1024}
        # Ray starts a worker per CPU for the first driver, before any task; fmtrain's actors and trials run in
        # workers started for them (their runtime env), so these stayed idle: ~1.4 CPU-s each, for nothing.
        options["_system_config"] = {"prestart_worker_first_driver": False}
    return options


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


# The Jobs API's states, in fmtrain's words.
JOB_STATES = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "completed", "STOPPED": "stopped", "FAILED": "failed"}
TERMINAL_JOB_STATES = ("SUCCEEDED", "STOPPED", "FAILED")


def jobs_client(address: str) -> Any:
    os.environ.update(ray_environment())
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


@dataclass
class RayJob:
    """A run submitted through the Ray Jobs API: its submission id and what the cluster says of it."""

    run_dir: Path
    submission_id: str
    address: str

    @classmethod
    def of(cls, run_dir: Path) -> RayJob | None:
        """The submitted job behind a run directory (None: the run was not submitted through the Jobs API)."""
        extra = JobRecord.read(run_dir).extra
        return cls(run_dir, extra["submission_id"], extra["address"]) if "submission_id" in extra else None

    def info(self) -> Any:
        return jobs_client(self.address).get_job_info(self.submission_id)

    def scheduler_state(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, STOPPED or FAILED."""
        return str(jobs_client(self.address).get_job_status(self.submission_id).value)

    def state(self) -> str:
        return JOB_STATES[self.scheduler_state()]

    def running(self) -> bool:
        return self.state() in ("pending", "running")

    def details(self) -> dict[str, Any]:
        """The Jobs API's state; fmtrain's state from it while job.json says the driver still runs
        (a driver that was stopped or killed could not record its end)."""
        scheduler = self.scheduler_state()
        found: dict[str, Any] = {"scheduler_state": scheduler}
        if JobRecord.read(self.run_dir).state in ("pending", "running"):
            found["state"] = JOB_STATES[scheduler]
        return found

    def result(self) -> dict[str, Any]:
        info = self.info()
        state = JOB_STATES[str(info.status.value)]
        return {"state": state, "exit_code": info.driver_exit_code, "message": info.message or ""}

    def cancel(self, wait_s: float = 30.0) -> None:
        """Ray stops the job's driver (SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S) and with it the
        workers; a later run in the same directory resumes from the newest checkpoint. Waits (up to
        ``wait_s``) for the cluster to confirm, then records the end the killed driver could not."""
        jobs_client(self.address).stop_job(self.submission_id)
        deadline = time.monotonic() + wait_s
        while (state := self.scheduler_state()) not in TERMINAL_JOB_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
        if (self.run_dir / "job.json").is_file() and state in TERMINAL_JOB_STATES:
            record = JobRecord.read(self.run_dir)
            if record.state in ("pending", "running"):
                record.state, record.ended, record.message = JOB_STATES[state], now(), "cancelled through the Ray Jobs API"
                record.write(self.run_dir)

    def driver_log(self) -> str:
        return str(jobs_client(self.address).get_job_logs(self.submission_id))

    def logs(self, rank: int = 0) -> list[Path]:
        return rank_logs(self.run_dir, rank)


def find_submission(address: str, submission_id: str) -> Any:
    """The Jobs API's record of a submission, whose metadata names its run directory."""
    try:
        return jobs_client(address).get_job_info(submission_id)
    except (RuntimeError, ConnectionError) as error:  # the client's "job does not exist" (an HTTP 404), or no dashboard
        raise RayError(f"{submission_id} is not a job on the Ray cluster at {address}: {error}") from error


class RayLauncher(ForegroundLauncher):
    """Ray Train workers driven from this process; ``launch`` returns when the run ends. Nothing is
    checked before Ray is up: ``launch`` checks the cluster's resources first thing."""

    @staticmethod
    def world_size(lc: LauncherConfig) -> int:
        return lc.num_workers

    @classmethod
    def handle(cls, run_dir: Path) -> JobHandle:
        """A Jobs API submission (its driver keeps the submission id in ``job.json``), or a foreground run."""
        submitted = RayJob.of(run_dir)
        return submitted if submitted is not None else ForegroundJob(run_dir)

    def launch(self, spec: RunSpec) -> JobHandle:
        os.environ.update(ray_environment())
        import ray

        from fmtrain.plan import make_plan

        lc = spec.config.launcher
        log.info("plan per rank:\n%s", make_plan(spec.config, self.world_size(lc)).table())
        record = JobRecord(
            launcher="ray",
            state="running",
            command=command_line(spec.argv),
            pid=os.getpid(),
            world_size=self.world_size(lc),
            started=now(),
            extra={"host": socket.gethostname()},
        )
        if (spec.run_dir / "job.json").exists():
            previous = JobRecord.read(spec.run_dir)
            record.attempts = previous.attempts + 1
            if "submission_id" in previous.extra:  # this is the driver of a Jobs API submission: keep its id
                record.extra, record.job_id, record.command = previous.extra | record.extra, previous.job_id, previous.command
        else:
            record.attempts = 1
        record.write(spec.run_dir)
        (spec.run_dir / RESULT_FILE).unlink(missing_ok=True)
        started_here = not ray.is_initialized() and lc.address is None
        if not ray.is_initialized():
            ray.init(**init_options(lc.address, lc.object_store_mb))
        try:
            check_resources(lc, ray.cluster_resources())
            record.job_id = record.job_id or ray.get_runtime_context().get_job_id()
            record.write(spec.run_dir)
            timeout_s = (spec.config.trainer.hang_timeout_s or 1800) + 60
            trainer = torch_trainer(lc, spec.entry, spec.run_dir.resolve() / "ray", timeout_s=timeout_s)
            try:
                trainer.fit()
            except Exception as error:  # Ray wraps the worker's exception (WorkerGroupError, TrainingFailedError)
                record.state, record.exit_code, record.message = "failed", 1, f"{type(error).__name__}: {error}"
            else:
                record.state, record.exit_code = run_outcome(spec.run_dir)["status"], 0
        except RayError as error:
            record.state, record.exit_code, record.message = "failed", 2, str(error)
        finally:
            if started_here:
                ray.shutdown()
        record.ended = now()
        record.write(spec.run_dir)
        return ForegroundJob(spec.run_dir)


class RayJobsLauncher(RayLauncher):
    """``launcher=ray launcher.submit=jobs``: the run goes through the Ray Jobs API to a cluster's
    dashboard, whose driver runs it as :class:`RayLauncher` does; ``launch`` returns the submission."""

    detached = True

    def launch(self, spec: RunSpec) -> RayJob:
        """Send the run through the Ray Jobs API; return as soon as the cluster has accepted it."""
        lc = spec.config.launcher
        run_dir = spec.run_dir.resolve()
        job_cfg = dataclasses.replace(
            spec.config, run_dir=str(run_dir), launcher=dataclasses.replace(lc, submit="foreground", address="auto")
        )
        job_spec = RunSpec(job_cfg, run_dir, spec.argv, spec.entrypoint)
        job_spec.write()  # config.yaml is what runs on the cluster
        submission_id = f"fmtrain-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        record = JobRecord(
            launcher="ray",
            state="pending",
            command=command_line(spec.argv),
            job_id=submission_id,
            world_size=self.world_size(lc),
            started=now(),
            extra={"submission_id": submission_id, "address": lc.address},
        )
        record.write(run_dir)  # before submitting: the job's driver updates this record when it starts
        client = jobs_client(str(lc.address))
        with tempfile.TemporaryDirectory(prefix="fmtrain-job-") as staging:
            shutil.copy(job_spec.config_path, Path(staging) / "config.yaml")
            try:
                client.submit_job(
                    entrypoint=shlex.join(["python", "-m", "launch.ray", "config.yaml", *entry_words(spec.entrypoint)]),
                    submission_id=submission_id,
                    runtime_env={"working_dir": staging, "env_vars": ray_environment()},
                    metadata={"run_dir": str(run_dir), "command": record.command},
                )
            except Exception as error:  # connection refused, HTTP errors: said, and recorded
                record.state, record.exit_code, record.message = "failed", 2, f"submission to {lc.address} failed: {error}"
                record.write(run_dir)
                raise RayError(record.message) from error
        log.info("submitted to the Ray cluster at %s as %s", lc.address, submission_id)
        return RayJob(run_dir, submission_id, str(lc.address))


def entry_words(entry: Entrypoint | None) -> list[str]:
    """An entry point other than the training run, as ``MODULE ARGS...`` on the driver's command line."""
    return [entry.module, *entry.args] if entry is not None else []


def main(argv: list[str]) -> int:
    """A Jobs API submission's entrypoint: ``python -m launch.ray config.yaml [MODULE ARGS...]`` runs it
    in the foreground (each worker runs ``MODULE``'s ``main(ARGS)``; fmtrain's training run by default)."""
    from fmtrain import config

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    cfg = config.load(argv[0])
    entry = Entrypoint(argv[1], tuple(argv[2:])) if len(argv) > 1 else None
    spec = RunSpec(cfg, Path(cfg.run_dir), argv=["python", "-m", "launch.ray", *argv], entrypoint=entry)
    spec.write()
    result = RayLauncher().launch(spec).result()
    if result["message"]:
        log.error("%s", result["message"])
    log.info("%s: %s", result["state"], spec.run_dir)
    return int(result["exit_code"] or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
