"""The Slurm launcher: sbatch through submitit; a sweep is one job array.

    fmtrain train launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8 [cluster=<site profile>]
    fmtrain train launcher=slurm ... --dry-run        # print the sbatch script and config; submit nothing
    fmtrain train -m optim.lr=1e-3,3e-4 launcher=slurm  # one array, launcher.array_parallelism at once

Each Slurm task is one rank (one per GPU, or ``launcher.tasks_per_node`` per CPU node): submitit
starts :class:`SlurmTask` in every task, which turns Slurm's variables into torch's
(``launch/env.py``) and runs the spec's entry point (fmtrain's ``run(cfg)``, as every launcher does).

Preemption and time limits: the job is submitted with ``--signal=USR2@<launcher.signal_delay_s>``
and ``--requeue``. USR2 (sent before the time limit, or by ``scancel --signal=USR2``) makes the
trainer save at the next step boundary; rank 0 then records why (``requeues.jsonl``: time limit or
preemption, told apart by the time used) and requeues the job, which resumes from that checkpoint,
up to ``launcher.max_requeues`` times. SIGTERM (``scancel``, ``fmtrain cancel``) saves and ends the
job without a requeue.

Before sbatch: the config and plan are validated (``fmtrain train`` does), and the request is
checked against ``sinfo`` (partition, node count, CPUs and GPUs per node). Jobs run a snapshot of
the code taken at submission (``<run or sweep dir>/code``), so editing the checkout while jobs wait
changes nothing. Variables that look like secrets (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``,
``*KEY*``) are removed from the environment sbatch passes on, unless ``launcher.env_allow`` names them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtrain.compat.submitit import SUBMIT_MODULE, convert_mem, make_sbatch_string
from fmtrain.config import LauncherConfig, TrainConfig, procs_per_task, slurm_world_size, tasks_per_node
from launch.slurm_task import REQUEUES, SlurmTask
from launch.spec import JobRecord, LaunchError, RunSpec, command_line, now, rank_logs

log = logging.getLogger("fmtrain.launch")

SECRET_PATTERNS = ("*TOKEN*", "*SECRET*", "*PASSWORD*", "*KEY*")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


class SlurmError(LaunchError):
    """A request Slurm cannot run, or a Slurm command that failed: said before anything is submitted."""


# ----------------------------------------------------------------------------- submitting


def secret_names(environ: dict[str, str] | os._Environ[str], allow: list[str]) -> list[str]:
    """Variables whose names look like secrets and that ``allow`` (names or globs) does not name."""
    return sorted(
        name
        for name in environ
        if any(fnmatch.fnmatch(name.upper(), p) for p in SECRET_PATTERNS) and not any(fnmatch.fnmatch(name, a) for a in allow)
    )


@contextlib.contextmanager
def without_secrets(allow: list[str]) -> Iterator[list[str]]:
    """sbatch passes this process's environment on to the job: take the secrets out meanwhile."""
    removed = {name: os.environ.pop(name) for name in secret_names(os.environ, allow)}
    try:
        yield sorted(removed)
    finally:
        os.environ.update(removed)


def snapshot_code(dest: Path) -> Path:
    """Copy the fmtrain and launch packages (as they are now) into ``dest``; jobs import from there."""
    import fmtrain
    import launch

    for package in (fmtrain, launch):
        source = Path(str(package.__file__)).parent
        shutil.copytree(source, dest / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    return dest


def sbatch_parameters(lc: LauncherConfig) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for a launcher config (sbatch flags by their names)."""
    params: dict[str, Any] = {
        "job_name": lc.job_name,
        "nodes": lc.nodes,
        "ntasks_per_node": tasks_per_node(lc),
        "time": lc.time_min,
        "signal_delay_s": lc.signal_delay_s,
        "array_parallelism": lc.array_parallelism,
        # A rank that dies ends the job instead of leaving the others waiting in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"requeue": True, **lc.sbatch},
    }
    optional = {
        "partition": lc.partition,
        "account": lc.account,
        "qos": lc.qos,
        "constraint": lc.constraint,
        "exclude": lc.exclude,
        "cpus_per_task": lc.cpus_per_task,
        "gpus_per_node": lc.gpus_per_node or None,
        "mem": convert_mem(lc.mem_gb) if lc.mem_gb else None,
    }
    params |= {k: v for k, v in optional.items() if v is not None}
    return params


def setup_lines(lc: LauncherConfig, code_dir: Path | None) -> list[str]:
    lines = list(lc.setup)
    if code_dir is not None:
        lines.append(f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}")
    return lines


def job_python(code_dir: Path | None) -> str:
    """The job's interpreter: this one. With a code snapshot, ``-P`` keeps ``python -m`` from putting
    the submission directory (often the checkout) before the snapshot on ``sys.path``."""
    return shlex.quote(sys.executable) + (" -P" if code_dir is not None else "")


def render_sbatch(lc: LauncherConfig, folder: Path, code_dir: Path | None, array: int | None = None) -> str:
    """The sbatch script submitit submits for this config (``--dry-run`` prints it)."""
    params = sbatch_parameters(lc)
    command = " ".join([job_python(code_dir), "-u -m", SUBMIT_MODULE, shlex.quote(str(folder / "%j"))])
    return make_sbatch_string(command, folder / "%j", setup_lines(lc, code_dir), array, **params)


def check_against_cluster(lc: LauncherConfig) -> None:
    """Refuse what the cluster cannot run (from ``sinfo``), so no job waits in the queue forever."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G|%a"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except FileNotFoundError as error:
        raise SlurmError("sinfo not found: this machine is not a Slurm submit host (or run: slurm/dev-cluster.sh up)") from error
    except subprocess.CalledProcessError as error:
        raise SlurmError(f"sinfo failed: {error.stderr.strip() or error}") from error
    nodes: dict[str, dict[str, Any]] = {}
    default: str | None = None
    for line in out.splitlines():
        name, partition, cpus, gres, avail = line.split("|")
        if partition.endswith("*"):
            partition = partition[:-1]
            default = partition
        gpus = sum(int(g.split(":")[-1].split("(")[0]) for g in gres.split(",") if g.startswith("gpu"))
        node = nodes.setdefault(name, {"partitions": set(), "cpus": int(cpus), "gpus": gpus, "up": avail == "up"})
        node["partitions"].add(partition)
    partitions = sorted({p for n in nodes.values() for p in n["partitions"]})
    wanted = lc.partition or default
    if wanted is None or wanted not in partitions:
        raise SlurmError(f"launcher.partition={lc.partition!r} is invalid: the cluster's partitions are {', '.join(partitions)}")
    members = [n for n in nodes.values() if wanted in n["partitions"]]
    cpus_needed = tasks_per_node(lc) * (lc.cpus_per_task or 1)
    fitting = [n for n in members if n["cpus"] >= cpus_needed and n["gpus"] >= lc.gpus_per_node]
    if lc.nodes > len(members):
        raise SlurmError(f"launcher.nodes={lc.nodes} is invalid: partition {wanted} has {len(members)} node(s)")
    if lc.nodes > len(fitting):
        raise SlurmError(
            f"launcher.nodes={lc.nodes} is invalid: only {len(fitting)} node(s) of partition {wanted} have "
            f"{cpus_needed} CPUs (tasks_per_node x cpus_per_task) and {lc.gpus_per_node} GPUs"
        )


@dataclass
class SlurmJob:
    """A submitted job (or one task of an array), known by its run directory."""

    run_dir: Path

    @property
    def record(self) -> JobRecord:
        return JobRecord.read(self.run_dir)

    def state(self) -> str:
        return scheduler_state(self.record.job_id) or self.record.state

    def result(self) -> dict[str, Any]:
        record = self.record
        return {"state": "submitted", "exit_code": 0, "message": f"Slurm job {record.job_id}: fmtrain status {self.run_dir}"}

    def running(self) -> bool:
        return scheduler_state(self.record.job_id) not in TERMINAL

    def cancel(self) -> None:
        subprocess.run(["scancel", self.record.job_id], check=True, timeout=60)

    def logs(self, rank: int = 0) -> list[Path]:
        record = self.record
        folder = Path(record.extra.get("slurm_folder", self.run_dir / "slurm"))
        return sorted(folder.glob(f"**/{record.job_id}_{rank}_log.*")) + rank_logs(self.run_dir, rank)

    def details(self) -> dict[str, Any]:
        """Slurm's state (sacct), requeues survived, and seconds from submission to the first step."""
        from fmtrain.metrics import read_jsonl

        record = self.record
        requeues = read_jsonl(self.run_dir / REQUEUES)
        found: dict[str, Any] = {
            "scheduler_state": scheduler_state(record.job_id),
            "requeues": sum(r["requeued"] for r in requeues),
        }
        first = next((r for r in read_jsonl(self.run_dir / "metrics.jsonl") if "loss" in r), None)
        if first is not None and first["step"] == 1 and "invoked_at" in record.extra:
            found["submit_to_first_step_s"] = round(first["time"] - record.extra["invoked_at"], 2)
        return found


def scheduler_state(job_id: str) -> str | None:
    """The job's state, e.g. RUNNING, COMPLETED, CANCELLED: the controller's while it still holds the job
    (``squeue``), else accounting's (``sacct``).

    Accounting is written by slurmdbd behind the controller: on a busy machine ``sacct`` said PENDING
    for a job whose ranks had already run steps. The controller forgets a finished job after
    ``MinJobAge`` (300 s by default); accounting keeps it.
    """
    return _queue_state(job_id) or _accounting_state(job_id)


def _queue_state(job_id: str) -> str | None:
    try:
        result = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i|%T"], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        return None
    # squeue -j 123_1 names the task even while the array's pending tasks are one record, 123_[0-2].
    states = [line.split("|")[1].split()[0] for line in result.stdout.splitlines() if line.split("|")[0] == job_id]
    return states[-1] if result.returncode == 0 and states else None


def _accounting_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True, timeout=30
        ).stdout
    except FileNotFoundError:
        return None
    states = [line.split("|")[1].split()[0] for line in out.splitlines() if line.split("|")[0] == job_id]
    return states[-1] if states else None


class SlurmLauncher:
    """Submits one run, or a sweep's runs as one job array; returns at once (jobs run in the queue)."""

    batched = True  # a sweep's runs are one job array
    detached = True

    @staticmethod
    def world_size(lc: LauncherConfig) -> int:
        return slurm_world_size(lc)

    def preflight(self, cfg: TrainConfig) -> None:
        check_against_cluster(cfg.launcher)

    @classmethod
    def handle(cls, run_dir: Path) -> SlurmJob:
        return SlurmJob(run_dir)

    def launch(self, spec: RunSpec) -> SlurmJob:
        return self.launch_all([spec], root=spec.run_dir)[0]

    def launch_all(self, specs: list[RunSpec], root: Path, code_dir: Path | None = None) -> list[SlurmJob]:
        """Submit ``specs`` (several: one job array) with their Slurm files under ``root``; the code
        snapshot is taken into ``root/code`` unless one is given (a sweep's trials share one)."""
        import submitit

        lc = specs[0].config.launcher
        check_against_cluster(lc)
        for spec in specs:  # the job may start elsewhere (-P, other nodes): no path relative to here
            data = spec.config.data
            data.paths = [p if os.path.isabs(os.path.expanduser(p)) else os.path.abspath(p) for p in data.paths]
            if data.cache_dir:
                data.cache_dir = os.path.abspath(os.path.expanduser(data.cache_dir))
            spec.write()
        invoked_at = float(os.environ.get("FMTRAIN_INVOKED_AT", time.time()))
        folder = root / "slurm"
        if code_dir is None and lc.code_snapshot:
            code_dir = snapshot_code(root / "code")
        executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=lc.max_requeues, python=job_python(code_dir))
        params = sbatch_parameters(lc)
        executor.update_parameters(setup=setup_lines(lc, code_dir), **params)
        tasks = [
            SlurmTask(str(s.config_path), s.entry, lc.time_min, lc.signal_delay_s, lc.max_requeues, procs_per_task(lc))
            for s in specs
        ]
        with without_secrets(lc.env_allow) as removed:
            if removed:
                log.info("not passed to the job (secret-looking; allow with launcher.env_allow): %s", ", ".join(removed))
            if len(tasks) == 1:
                jobs = [executor.submit(tasks[0])]
            else:
                with executor.batch():
                    pending = [executor.submit(task) for task in tasks]
                jobs = pending
        handles = []
        for spec, job in zip(specs, jobs, strict=True):
            earlier = JobRecord.read(spec.run_dir).attempts if (spec.run_dir / "job.json").is_file() else 0
            record = JobRecord(
                launcher="slurm",
                state="pending",
                command=command_line(spec.argv),
                job_id=str(job.job_id),
                world_size=self.world_size(lc),
                started=now(),
                attempts=earlier,  # each start of the job adds one, as a rerun of a local run does
                extra={
                    "invoked_at": invoked_at,
                    "slurm_folder": str(folder),
                    "code": str(code_dir or ""),
                    "attempts_before": earlier,
                },
            )
            record.write(spec.run_dir)
            log.info("submitted Slurm job %s: %s", job.job_id, spec.run_dir)
            handles.append(SlurmJob(spec.run_dir))
        return handles
