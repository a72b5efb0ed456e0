"""The launchers by name: ``launcher=local|slurm|ray`` picks one; each is a file of its own.

job = make_launcher(cfg.launcher.name).launch(spec)     # spec: a RunSpec (launch.spec)
"""

from __future__ import annotations

from launch.spec import Launcher


def make_launcher(name: str) -> Launcher:
    from launch.local import LocalLauncher
    from launch.ray import RayLauncher
    from launch.slurm import SlurmLauncher

    launchers: dict[str, type[Launcher]] = {"local": LocalLauncher, "slurm": SlurmLauncher, "ray": RayLauncher}
    return launchers[name]()
