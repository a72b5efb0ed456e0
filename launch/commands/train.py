"""``fmtrain train [OVERRIDES...] [-m] [--cfg job] [--dry-run]``: compose, check every run, launch them."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from fmtrain.config import TrainConfig
from launch.commands import FMTRAIN_FLAGS, split_flags, usage
from launch.compose import UsageError, check_option_keys, compose, conf_dir, expand_sweep

log = logging.getLogger("fmtrain.launch")


def _gpus_available() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_train(overrides: list[str], multirun: bool, dry_run: bool = False) -> list[tuple[list[str], TrainConfig]]:
    """Compose and validate every job the command line asks for (and for Slurm, check the request
    against the cluster); return each job's overrides and config."""
    checked: set[str] = set()
    checked_jobs: list[tuple[list[str], TrainConfig]] = []
    jobs = expand_sweep(overrides)
    if len(jobs) > 1 and not multirun:
        raise UsageError(f"{' '.join(overrides)} describes a sweep of {len(jobs)} runs; add -m to run them all")
    from fmtrain.config import ConfigError
    from fmtrain.validation import validate
    from launch.launchers import check_run_dir, claim_run_dir, make_launcher
    from launch.spec import LaunchError

    gpus = None
    for job in jobs:
        cfg = compose(job, check=False, option_keys=False)
        if gpus is None and cfg.trainer.device != "cpu":
            gpus = _gpus_available()

        try:
            validate(cfg, gpus_available=gpus)
            check_run_dir(cfg)
        except ConfigError as error:
            raise UsageError(str(error) + (f"  (in run {' '.join(job)})" if len(jobs) > 1 else "")) from error
        check_option_keys(cfg, job)
        if not dry_run and repr(cfg.launcher) not in checked:
            try:
                make_launcher(cfg.launcher).preflight(cfg)  # before Hydra writes run directories
            except LaunchError as error:
                raise UsageError(str(error)) from error
            checked.add(repr(cfg.launcher))
        checked_jobs.append((job, cfg))
    claimed: set[str] = set()
    for job, cfg in checked_jobs if not dry_run else ():
        if cfg.run_dir not in claimed:  # a -m sweep's runs share one: its root
            try:
                claim_run_dir(cfg)
            except ConfigError as error:
                raise UsageError(str(error) + (f"  (in run {' '.join(job)})" if len(jobs) > 1 else "")) from error
            claimed.add(cfg.run_dir)
    return checked_jobs


_exit_codes: list[int] = []

_argv: list[str] = []  # the command's arguments as given (what job.json records)


_queued: list = []  # RunSpecs for launchers that submit after Hydra has composed every run (Slurm)


def _train_task(node: object) -> None:
    """Hydra's task function: one run (one job of a sweep) from composition to the end."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from fmtrain.config import to_config
    from launch.launchers import make_launcher
    from launch.spec import RunSpec

    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    container = OmegaConf.to_container(node, resolve=True)
    assert isinstance(container, dict)
    container["run_dir"] = str(run_dir)
    cfg = to_config(container)
    spec = RunSpec(cfg, run_dir, argv=["fmtrain", "train", *_argv])
    spec.write()
    log.info("run directory: %s", run_dir)
    launcher = make_launcher(cfg.launcher)
    if launcher.batched:
        _queued.append(spec)  # launched together: one job array for a sweep
        return
    job = launcher.launch(spec)
    if launcher.detached:
        from launch.spec import JobRecord

        print(f"{JobRecord.read(run_dir).job_id}\t{run_dir}")  # the scheduler's id: the run goes on there
        return
    result = job.result()
    if result["message"]:
        (log.error if result["state"] == "failed" else log.warning)("%s", result["message"])
    log.info("%s: %s", result["state"], run_dir)
    _exit_codes.append(int(result["exit_code"] or 0))


def main(args: list[str]) -> int:
    from fmtrain.config import register_schema

    if "-h" in args or "--help" in args:
        print(usage())
        return 0
    flags, overrides = split_flags(args)
    multirun = "-m" in flags or "--multirun" in flags
    jobs = check_train(overrides, multirun, dry_run="--dry-run" in flags)
    if "--dry-run" in flags:
        return _dry_run(jobs)
    flags = [f for f in flags if f not in FMTRAIN_FLAGS]
    _argv[:] = [*flags, *overrides]
    if len(run_dirs := {cfg.run_dir for _, cfg in jobs}) == 1:  # Hydra writes the one checked and claimed
        overrides = [*overrides, f"run_dir={hydra_quoted(run_dirs.pop())}"]  # (${now:...} resolved once)

    import hydra

    register_schema()
    sys.argv = ["fmtrain train", *flags, *overrides]
    app = hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)(_train_task)
    app()
    if _queued:
        _submit_queued(multirun)
    failed = [code for code in _exit_codes if code]
    return failed[0] if failed else 0


def hydra_quoted(value: str) -> str:
    """``value`` as one quoted string in Hydra's override grammar (any character: a path with spaces, = or ,).
    Hydra reads a backslash as an escape only before a quote or at the end: those are doubled, quotes escaped."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"


def _submit_queued(multirun: bool) -> None:
    """Launch the runs a batched launcher (Slurm) collected: together, as one job array for a sweep."""
    from fmtrain.plan import make_plan
    from launch.launchers import make_launcher
    from launch.spec import JobRecord, LaunchError

    root = _queued[0].run_dir.parent if multirun else _queued[0].run_dir
    cfg = _queued[0].config
    launcher = make_launcher(cfg.launcher)
    log.info("plan per rank:\n%s", make_plan(cfg, launcher.world_size(cfg.launcher)).table())
    try:
        jobs = launcher.launch_all(list(_queued), root=root)
    except LaunchError as error:
        raise UsageError(str(error)) from error
    for job in jobs:
        print(f"{JobRecord.read(job.run_dir).job_id}\t{job.run_dir}")


def _dry_run(jobs: list[tuple[list[str], TrainConfig]]) -> int:
    """Print what would run: the resolved config of each job, and the sbatch script for Slurm."""
    from fmtrain.config import to_yaml

    for job, cfg in jobs:
        print(f"# config ({' '.join(job)})\n{to_yaml(cfg)}")
    from fmtrain.plan import make_plan
    from launch.launchers import make_launcher

    first = jobs[0][1]
    world = make_launcher(first.launcher).world_size(first.launcher)
    print(f"# plan per rank\n{make_plan(first, world).table()}\n")
    if first.launcher.name == "slurm":
        from launch.slurm import SlurmError, check_against_cluster, render_sbatch

        lc = first.launcher
        root = Path(first.run_dir).resolve()
        root = root.parent if len(jobs) > 1 else root
        print("# sbatch script (submitit fills in %j)")
        print(
            render_sbatch(
                lc, root / "slurm", root / "code" if lc.code_snapshot else None, array=len(jobs) if len(jobs) > 1 else None
            )
        )
        try:
            check_against_cluster(lc)
        except SlurmError as error:
            print(f"# not submittable here: {error}")
    print("# dry run: nothing started, nothing submitted")
    return 0
