"""The launchers by name, and the handle of a run they started, found again from its directory.

    launcher = make_launcher(cfg.launcher)      # local | slurm | ray (ray with launcher.submit=jobs: the Jobs API)
    launcher.preflight(cfg)                     # what the scheduler cannot run, refused before anything is written
    job = launcher.launch(spec)                 # spec: a RunSpec (launch.spec)
    handle_for(run_dir).cancel()                # whichever launcher started it

Adding a launcher adds a class (the :class:`~launch.spec.Launcher` contract) and a line in
``LAUNCHERS``; ``fmtrain train|status|logs|cancel`` and ``fmtrain tune`` ask the launcher or the
handle and never branch on a launcher's name.
"""

from __future__ import annotations

import fcntl
import importlib
import os
from pathlib import Path
from typing import Any

from fmtrain.config import ConfigError, LauncherConfig, TrainConfig
from launch.spec import JobHandle, JobRecord, Launcher

# name -> "module:class", imported on first use (a launcher's module may import ray or submitit).
LAUNCHERS = {
    "local": "launch.local:LocalLauncher",
    "slurm": "launch.slurm:SlurmLauncher",
    "ray": "launch.ray:RayLauncher",
    "ray_jobs": "launch.ray:RayJobsLauncher",  # launcher=ray launcher.submit=jobs
}


def launcher_class(name: str) -> type[Launcher]:
    module, _, attribute = LAUNCHERS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def make_launcher(lc: LauncherConfig) -> Launcher:
    """The launcher a config asks for."""
    name = "ray_jobs" if lc.name == "ray" and lc.submit == "jobs" else lc.name
    return launcher_class(name)()


def handle_for(run_dir: Path) -> JobHandle:
    """The job behind a run directory, from its ``job.json``: the handle its launcher makes (a Slurm
    job, a Ray Jobs submission, or a run whose launcher ran in the foreground)."""
    return launcher_class(JobRecord.read(run_dir).launcher).handle(run_dir)


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse (:class:`ConfigError`), before anything starts, a run directory the run could not use:
    one it cannot write (a read-only mount), one whose job is still queued or running (two jobs would
    write the same checkpoints), a ``trainer.resume`` checkpoint that fails its checks, or checkpoints
    that are all invalid (the run would start over and overwrite them). A directory not visible here
    (a Slurm cluster's own file system) is left to the job, which checks it again when it starts."""
    from fmtrain.manifests import CheckpointError, every_checkpoint_invalid, invalid_checkpoints, run_dir_problem, verify

    run_dir = Path(cfg.run_dir).expanduser()
    resume = cfg.trainer.resume
    if resume not in ("auto", "never"):
        try:
            verify(Path(resume).expanduser())
        except CheckpointError as error:
            raise ConfigError("trainer.resume", resume, str(error)) from error
    visible = run_dir.exists() or run_dir.parent.exists()
    if visible and (problem := run_dir_problem(run_dir)) is not None:
        raise ConfigError("run_dir", cfg.run_dir, problem)
    if (run_dir / "job.json").is_file() and (handle := handle_for(run_dir)).running():
        record = JobRecord.read(run_dir)
        raise ConfigError(
            "run_dir",
            cfg.run_dir,
            f"job {record.job_id or record.pid} ({record.launcher}) is still {handle.state()} in it; "
            f"wait for it, or fmtrain cancel {cfg.run_dir}, or choose another run_dir",
        )
    if resume == "auto" and (reasons := invalid_checkpoints(run_dir / "checkpoints")):
        raise ConfigError("trainer.resume", "auto", every_checkpoint_invalid(reasons))


# A run directory is claimed by the ``fmtrain train`` that starts a run in it, with an exclusive lock on CLAIM held
# until that process ends (the kernel lets go of a dead holder's lock): of two commands started at the same
# moment into one run directory, one runs and the other is refused. The claim is taken after the checks and the
# directory checked again under it, so the check and the claim are one step; a job it leaves behind (a Slurm or
# Ray Jobs submission, once the command has returned) is then refused by its job.json, as before.
CLAIM = ".fmtrain.lock"
_claims: list[Any] = []  # the lock files of this process's claims, open until it ends


def claim_run_dir(cfg: TrainConfig) -> None:
    """Claim ``cfg.run_dir`` for this process (made if new, with its parents: the command writes its config
    there next, whatever the launcher), then check it again (:func:`check_run_dir`); :class:`ConfigError` if
    another fmtrain command holds it, or it cannot be made."""
    run_dir = Path(cfg.run_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("run_dir", cfg.run_dir, f"cannot make it: {error.strerror or error}") from None
    lock = open(run_dir / CLAIM, "a+")  # noqa: SIM115 (held open until this process ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        check_run_dir(cfg)  # its job.json, once written, names the job
        raise ConfigError(
            "run_dir",
            cfg.run_dir,
            f"another fmtrain command (pid {holder}) is starting or running a run in it; wait for it, or choose another run_dir",
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _claims.append(lock)
    check_run_dir(cfg)
