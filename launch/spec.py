"""What a launcher receives (:class:`RunSpec`, what each rank runs: :class:`Entrypoint`) and returns
(:class:`JobHandle`), and ``job.json``.

    spec = RunSpec(cfg, run_dir)                                   # each rank runs a training run
    spec = RunSpec(cfg, run_dir, entrypoint=Entrypoint("my_pkg.job", ("--epochs", "3")))  # or a program
    handle = make_launcher(cfg.launcher).launch(spec)

The run directory is the unit of record: ``config.yaml`` (resolved), ``job.json`` (launcher, ids,
state, command line), logs, metrics and checkpoints. ``fmtrain status`` works from it alone.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shlex
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fmtrain.config import LauncherConfig, TrainConfig, to_yaml

JOB_FILE = "job.json"


RESULT_FILE = "result.json"
TRAINING = "fmtrain.worker"  # the training run's entry point, and the process runner of every other


@dataclass(frozen=True)
class Entrypoint:
    """What every rank of a run executes, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT set (``torch.distributed.init_process_group()`` works as is): a module with
    ``main(argv: list[str]) -> int`` that returns 0 or raises.

    A launcher runs it as a process, ``python -u -m fmtrain.worker -m MODULE ARGS...`` (local; Slurm
    with several ranks per task: a failing rank's traceback reaches the launcher), or calls
    ``MODULE.main(ARGS)`` in the rank's own process (a Ray worker; a Slurm task that is one rank).
    Rank 0 may write ``RUN_DIR/result.json`` (``status``: completed or stopped, ``step``,
    ``stop_signal``), which the launcher records; without one, a return counts as completed.
    """

    module: str
    args: tuple[str, ...] = ()

    @classmethod
    def training(cls, config_path: Path) -> Entrypoint:
        """fmtrain's training run of a written config (:mod:`fmtrain.worker`)."""
        return cls(TRAINING, (str(config_path),))

    def worker_args(self) -> list[str]:
        """The arguments of :mod:`fmtrain.worker` that run this entry point."""
        return list(self.args) if self.module == TRAINING else ["-m", self.module, *self.args]

    def process_args(self) -> list[str]:
        """The arguments of the Python interpreter that runs this entry point as a process."""
        return ["-u", "-m", TRAINING, *self.worker_args()]

    def call(self) -> None:
        """Run it in this process; a non-zero return is raised as an error."""
        code = importlib.import_module(self.module).main(list(self.args))
        if code:
            raise RuntimeError(f"python -m {shlex.join([self.module, *self.args])} ended with exit code {code}")


@dataclass
class RunSpec:
    """One run to start: the validated config (its launcher, its run directory), the directory it
    owns, and what each rank runs (fmtrain's training run unless another entry point is given)."""

    config: TrainConfig
    run_dir: Path
    argv: list[str] = field(default_factory=list)
    entrypoint: Entrypoint | None = None

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def entry(self) -> Entrypoint:
        return self.entrypoint or Entrypoint.training(self.config_path)

    def write(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_yaml(self.config))


@dataclass
class JobRecord:
    """The contents of ``job.json``."""

    launcher: str
    state: str
    command: str
    job_id: str = ""
    pid: int = 0
    world_size: int = 1
    started: str = ""
    ended: str = ""
    exit_code: int | None = None
    attempts: int = 0
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # launcher-specific: Slurm folder, code snapshot, ...

    @classmethod
    def read(cls, run_dir: Path) -> JobRecord:
        return cls(**json.loads((run_dir / JOB_FILE).read_text()))

    def write(self, run_dir: Path) -> None:
        tmp = run_dir / f".{JOB_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, run_dir / JOB_FILE)


def run_outcome(run_dir: Path) -> dict[str, Any]:
    """What rank 0 of the run's entry point wrote to ``result.json``; a completed run if it wrote none."""
    path = run_dir / RESULT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {"status": "completed", "step": None, "stop_signal": None}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is no such process
    or it has exited and only waits to be reaped (a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 on, after the parenthesised command name
    if fields[0] in ("Z", "X"):
        return None
    ticks = int(fields[19])  # field 22
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def launcher_alive(record: JobRecord) -> bool:
    """Whether the process that wrote ``record`` as running still runs: a process of that pid that
    started before the record did (a pid freed by a killed launcher may be some other process's now)."""
    if record.state != "running" or not record.pid or not record.started:
        return False
    if record.extra.get("host", socket.gethostname()) != socket.gethostname():
        return True  # another machine's process: the record is all there is to go on
    started = process_started(record.pid)
    recorded = datetime.datetime.strptime(record.started, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    return started is not None and started < recorded + 1.0  # the record's time is cut to the second


def command_line(argv: list[str]) -> str:
    return shlex.join(argv)


class JobHandle(Protocol):
    """A started job, found again from its run directory (``launch.launchers.handle_for``): its state,
    its result, its logs, what its scheduler says of it, and a way to stop it."""

    run_dir: Path

    def state(self) -> str: ...

    def running(self) -> bool:
        """Whether the job may still write to its run directory (queued or running)."""
        ...

    def result(self) -> dict[str, Any]: ...

    def cancel(self) -> None: ...

    def logs(self, rank: int = 0) -> list[Path]:
        """Rank ``rank``'s log files that exist, the scheduler's output first."""
        ...

    def details(self) -> dict[str, Any]:
        """For ``fmtrain status``: what the scheduler says, over what ``job.json`` says."""
        ...


@dataclass
class ForegroundJob:
    """A job that ran in this (the CLI's) process and has ended: local and Ray runs."""

    run_dir: Path
    ended: JobRecord | None = None  # the launcher's own record of the end, should job.json not take it (a full disk)

    def record(self) -> JobRecord:
        """``job.json``, corrected where it says running but its launcher is gone (SIGKILL, OOM
        killer, a lost node): that launcher could not record its end, so the run has failed."""
        if self.ended is not None:
            return self.ended
        record = JobRecord.read(self.run_dir)
        if record.state == "running" and not launcher_alive(record):
            record.state = "failed"
            record.message = f"the launcher (pid {record.pid}) ended without recording an end: killed?; rerun to resume"
        return record

    def state(self) -> str:
        return self.record().state

    def running(self) -> bool:
        return self.state() == "running"

    def result(self) -> dict[str, Any]:
        record = self.record()
        return {"state": record.state, "exit_code": record.exit_code, "message": record.message}

    def cancel(self) -> None:
        """SIGTERM to the launching process (while it runs): every rank saves, then the job ends."""
        import signal

        record = JobRecord.read(self.run_dir)
        if launcher_alive(record):
            os.kill(record.pid, signal.SIGTERM)

    def logs(self, rank: int = 0) -> list[Path]:
        return rank_logs(self.run_dir, rank)

    def details(self) -> dict[str, Any]:
        record = self.record()  # a killed launcher's "running" is corrected
        return {"state": record.state, "message": record.message}


def rank_logs(run_dir: Path, rank: int) -> list[Path]:
    log = run_dir / "logs" / f"rank{rank}.log"
    return [log] if log.is_file() else []


class LaunchError(RuntimeError):
    """A request a launcher's scheduler cannot run, or a scheduler command that failed (exit 2, one line)."""


class Launcher(Protocol):
    """Starts runs (``launch.launchers`` names them). Each launcher answers:

    - ``world_size(lc)``: how many ranks it starts for its options;
    - ``preflight(cfg)``: refuse (:class:`LaunchError`) what its scheduler cannot run, before any
      run directory is written (Slurm asks ``sinfo``; Ray checks its resources once it is up);
    - ``launch(spec)`` one run, ``launch_all(specs, root)`` several (a Slurm sweep: one job array);
      each rank runs ``spec.entry`` (:class:`Entrypoint`);
    - ``handle(run_dir)``: the handle of a run it started, from the run directory alone;
    - ``batched``: runs of a sweep are collected and launched together; ``detached``: ``launch``
      returns while the run goes on elsewhere (its id is printed).
    """

    batched: bool
    detached: bool

    @staticmethod
    def world_size(lc: LauncherConfig) -> int: ...

    def preflight(self, cfg: TrainConfig) -> None: ...

    def launch(self, spec: RunSpec) -> JobHandle: ...

    def launch_all(self, specs: list[RunSpec], root: Path) -> list[JobHandle]: ...

    @classmethod
    def handle(cls, run_dir: Path) -> JobHandle: ...


class ForegroundLauncher:
    """A launcher whose ``launch`` runs the job from this process and returns when it has ended (local,
    Ray): a sweep's runs go one after another, and a run's handle is its ``job.json``."""

    batched = False
    detached = False

    def preflight(self, cfg: TrainConfig) -> None:
        """Nothing beyond validation, which checks this machine's cores, GPUs and device."""

    def launch(self, spec: RunSpec) -> JobHandle:
        raise NotImplementedError

    def launch_all(self, specs: list[RunSpec], root: Path) -> list[JobHandle]:
        return [self.launch(spec) for spec in specs]

    @classmethod
    def handle(cls, run_dir: Path) -> JobHandle:
        return ForegroundJob(run_dir)
