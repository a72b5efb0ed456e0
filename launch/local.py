"""The local launcher: N training processes on this machine under torch's elastic agent.

    fmtrain train launcher.nproc=2

Like ``torchrun --standalone``, the agent runs in this (the CLI's) process and ``launch`` returns when
the job has ended. On CPUs each rank is forked from this process, which has imported torch and
``fmtrain.worker`` once (``launcher.start=auto`` or ``fork``): a rank starts in a fraction of a second
instead of the ~2.5 s a fresh interpreter spends importing them. Where the ranks use GPUs each starts
as a fresh interpreter, as torchrun starts them (``exec``). Rendezvous and the process group stay on
127.0.0.1. If any rank fails, the agent stops every rank and the failing rank's traceback is shown;
SIGTERM or Ctrl-C reach every rank, which saves a checkpoint at the next step boundary and exits.
Workers die with the agent (PR_SET_PDEATHSIG), so even a SIGKILLed launcher leaves no orphan.

Per-rank output: rank 0 prints to this terminal; every other rank's stdout and stderr go to
``logs/rank<R>.stdout`` and ``.stderr``; every rank logs to ``logs/rank<R>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs

from fmtrain.config import ConfigError, LauncherConfig, TrainConfig, usable_cpus
from launch.spec import (
    RESULT_FILE,
    ForegroundJob,
    ForegroundLauncher,
    JobRecord,
    LaunchError,
    RunSpec,
    command_line,
    now,
    run_outcome,
)

log = logging.getLogger("fmtrain.launch")


class RunDirLogs(LogsSpecs):
    """Puts each rank's redirected output and error file under ``<run_dir>/logs``, named by rank."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(log_dir=str(log_dir))
        self.log_dir = log_dir

    @property
    def root_log_dir(self) -> str:
        return str(self.log_dir)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        dest = LogsDest(stdouts=dict.fromkeys(envs, ""), stderrs=dict.fromkeys(envs, ""))
        for local_rank, env in envs.items():
            rank = env["RANK"]
            error_file = self.log_dir / f"rank{rank}.error.json"
            error_file.unlink(missing_ok=True)
            env["TORCHELASTIC_ERROR_FILE"] = str(error_file)
            dest.error_files[local_rank] = str(error_file)
            if rank != "0":
                dest.stdouts[local_rank] = str(self.log_dir / f"rank{rank}.stdout")
                dest.stderrs[local_rank] = str(self.log_dir / f"rank{rank}.stderr")
        return dest


def first_failure(error: Any, log_dir: Path | None = None) -> tuple[int, Any]:
    """The rank that failed first, from a ChildFailedError: the oldest error file, to the nanosecond
    (torch's own choice compares whole seconds, so a rank that only saw its peer go, a reset
    connection in a collective, ties with the rank whose error it was and wins by its lower number).
    Forked ranks (``launcher.start=fork``): torch reports the first ended process it finds, which may be
    the peer; the other ranks' error files in ``log_dir``, each with its pid, are candidates too."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failures = dict(error.failures)
    for path in sorted(log_dir.glob("rank*.error.json")) if log_dir else ():
        rank = int(path.name.removeprefix("rank").split(".")[0])
        if rank not in failures and (pid := recorded_pid(path)):  # a forked rank that raised: exit code 1
            failures[rank] = ProcessFailure(local_rank=rank, pid=pid, exitcode=1, error_file=str(path))

    def written(rank: int) -> tuple[float, int]:
        try:
            return os.stat(failures[rank].error_file).st_mtime_ns, rank
        except OSError:  # no error file: killed, or died before it could write one
            return float("inf"), rank

    rank = min(failures, key=written)
    return rank, failures[rank]


def recorded_pid(error_file: Path) -> int | None:
    """The pid a forked rank wrote into its error file (:func:`fmtrain.worker.forked`), if any."""
    try:
        return int(json.loads(error_file.read_text())["message"]["extraInfo"]["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def failure_report(error: Any, log_dir: Path | None = None) -> str:
    """The first failing rank, its exit code and its traceback, from a ChildFailedError (and the ranks'
    error files in ``log_dir``: :func:`first_failure`)."""
    rank, failure = first_failure(error, log_dir)
    detail = failure.message
    if isinstance(detail, dict):
        message = detail.get("message", "")
        if message.startswith("HangError: "):  # the watchdog's message names the ranks itself
            return message.removeprefix("HangError: ")
        for kind in ("ConfigError: ", "CheckpointError: "):  # a user error, a full disk: one line
            if message.startswith(kind):
                return f"rank {rank}: {message.removeprefix(kind)}"
        detail = detail.get("extraInfo", {}).get("py_callstack") or message
    status = f"exit code {failure.exitcode}"
    if failure.exitcode < 0 and failure.error_file and os.path.isfile(failure.error_file):
        # It raised, and the agent stopped it while it was exiting: another rank's exit came first.
        status = f"raised, then stopped by {signal.Signals(-failure.exitcode).name} as the job ended"
    return f"rank {rank} failed ({status}, pid {failure.pid}):\n{detail}".rstrip()


def forks(cfg: TrainConfig) -> bool:
    """Whether the ranks are forked from this process (``launcher.start``): auto forks them where they run on
    CPUs, and starts a fresh interpreter per rank (as torchrun does) where they use GPUs: CUDA cannot run in
    a process forked from one that initialized it, and this process asks the GPUs for their memory."""
    if cfg.launcher.start != "auto":
        return cfg.launcher.start == "fork"
    if cfg.trainer.device == "cpu":
        return True
    import torch

    return cfg.trainer.device == "auto" and not torch.cuda.is_available()


class ForkedRankFailure(logging.Filter):
    """Drops torch's own log line for a forked rank that failed: a traceback of the agent's, not the rank's,
    whose error this launcher reports (:func:`failure_report`) as it does for a rank started afresh."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


class LocalLauncher(ForegroundLauncher):
    """Ranks on this machine under torch's elastic agent; ``launch`` returns when the run ends."""

    @staticmethod
    def world_size(lc: LauncherConfig) -> int:
        return lc.nproc

    def preflight(self, cfg: TrainConfig) -> None:
        """Refuse a run whose ranks' parameters, gradients, optimizer state and activations (``fmtrain
        plan``'s estimate) cannot fit this machine: its memory on CPU, a GPU's on CUDA."""
        import torch

        from fmtrain.plan import sizes

        nproc, gib = cfg.launcher.nproc, 1024**3
        per_rank = sizes(cfg, nproc).total_bytes
        on_gpu = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
        if on_gpu:
            need, capacity, what = per_rank, torch.cuda.get_device_properties(0).total_memory, "a GPU's memory"
        else:
            need, capacity, what = (
                per_rank * nproc,
                os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                "this machine's memory",
            )
        if need > capacity:
            ranks = f" x {nproc} ranks" if not on_gpu and nproc > 1 else ""
            raise LaunchError(
                str(
                    ConfigError(
                        "model.name",
                        cfg.model.name,
                        f"needs about {per_rank / gib:.1f} GiB per rank{ranks} (parameters, gradients, AdamW state, "
                        f"activations: fmtrain plan) but {what} is {capacity / gib:.1f} GiB: a smaller model or batch, "
                        "a sharding strategy with more ranks, or another launcher",
                    )
                )
            )

    def launch(self, spec: RunSpec) -> ForegroundJob:
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        cfg = spec.config.launcher
        nproc = cfg.nproc
        # torchrun's rule: one thread per rank unless the user chose; here, the cores shared out.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
        os.environ["FMTRAIN_DIE_WITH_PARENT"] = "1"
        logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
        processes = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
        if not any(isinstance(f, ForkedRankFailure) for f in processes.filters):
            processes.addFilter(ForkedRankFailure())

        run_id = f"fmtrain-{uuid.uuid4().hex[:12]}"
        record = JobRecord(
            launcher="local",
            state="running",
            command=command_line(spec.argv),
            job_id=run_id,
            pid=os.getpid(),
            world_size=nproc,
            started=now(),
            extra={"host": socket.gethostname()},
        )
        if (spec.run_dir / "job.json").exists():
            record.attempts = JobRecord.read(spec.run_dir).attempts
        record.attempts += 1
        record.write(spec.run_dir)
        (spec.run_dir / RESULT_FILE).unlink(missing_ok=True)  # rank 0 writes it anew when this attempt ends

        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=run_id,
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            local_addr="127.0.0.1",
            max_restarts=cfg.max_restarts,
            monitor_interval=cfg.monitor_interval,
            shutdown_timeout=cfg.shutdown_timeout,
            logs_specs=RunDirLogs(spec.run_dir / "logs"),
        )
        try:
            if forks(spec.config):
                import fmtrain.worker  # what the ranks run, imported once here: each forked rank has it

                fmtrain.worker.preload()
                config.start_method = "fork"
                elastic_launch(config, fmtrain.worker.forked)(*spec.entry.worker_args())
            else:
                elastic_launch(config, sys.executable)(*spec.entry.process_args())
        except ChildFailedError as error:
            record.state, record.exit_code = "failed", 1
            record.message = failure_report(error, spec.run_dir / "logs")
        except SignalException as error:
            record.state, record.exit_code = "stopped", 128 + int(error.sigval)
            record.message = f"stopped by {signal.Signals(error.sigval).name}; rerun the same command to resume"
        else:
            record.state, record.exit_code = run_outcome(spec.run_dir)["status"], 0
        record.ended = now()
        try:
            record.write(spec.run_dir)
        except OSError as error:  # a full or read-only disk: the run's end is still told, here
            log.error("could not record the run's end in %s/job.json (%s): %s", spec.run_dir, error, record.message)
            return ForegroundJob(spec.run_dir, ended=record)
        return ForegroundJob(spec.run_dir)


def main(argv: list[str]) -> int:
    """``python -m launch.local RUN_DIR/config.yaml``: run a written config with the local launcher
    (``fmtrain tune`` starts its multi-rank trials this way)."""
    from fmtrain import config

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", stream=sys.stdout)
    cfg = config.load(argv[0])
    result = LocalLauncher().launch(RunSpec(cfg, Path(cfg.run_dir), argv=["python", "-m", "launch.local", *argv])).result()
    if result["message"]:
        log.error("%s", result["message"])
    return int(result["exit_code"] or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
