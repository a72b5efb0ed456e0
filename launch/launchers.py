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

import importlib
from pathlib import Path

from fmtrain.config import LauncherConfig
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
