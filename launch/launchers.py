"""The launchers by name, and the handle of a run they started, found again from its directory.

    job = make_launcher(cfg.launcher.name).launch(spec)     # spec: a RunSpec (launch.spec)
    handle_for(run_dir).cancel()                            # whichever launcher started it

``fmtrain status|logs|cancel`` and ``fmtrain tune`` ask the handle; only this module knows which
launcher makes which kind of handle.
"""

from __future__ import annotations

from pathlib import Path

from launch.spec import ForegroundJob, JobHandle, JobRecord, Launcher


def make_launcher(name: str) -> Launcher:
    from launch.local import LocalLauncher
    from launch.ray import RayLauncher
    from launch.slurm import SlurmLauncher

    launchers: dict[str, type[Launcher]] = {"local": LocalLauncher, "slurm": SlurmLauncher, "ray": RayLauncher}
    return launchers[name]()


def handle_for(run_dir: Path) -> JobHandle:
    """The job behind a run directory, from its ``job.json``: a Slurm job, a Ray Jobs submission, or a
    run whose launcher ran in the foreground (local, Ray)."""
    launcher = JobRecord.read(run_dir).launcher
    if launcher == "slurm":
        from launch.slurm import SlurmJob

        return SlurmJob(run_dir)
    if launcher == "ray":
        from launch.ray import RayJob

        if (submitted := RayJob.of(run_dir)) is not None:
            return submitted
    return ForegroundJob(run_dir)
