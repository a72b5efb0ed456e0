"""``fmtrain tune``: Ray Tune over fmtrain's config; every trial is a real fmtrain run.

    fmtrain tune tune=asha tune.num_samples=8 trainer.max_steps=200 trainer.eval_interval=20
    fmtrain tune tune=optuna '+tune.space.model.n_layers="choice([2, 4])"'    # beside conf/tune/optuna.yaml's space
    fmtrain tune tune=pbt ...        fmtrain tune tune=grid ...        fmtrain tune ... tune.resume=true

The search space lives in the config (``tune.space``: key -> distribution). Each trial applies its
values to the composed config, is validated like any run, and trains in its own run directory
(``<sweep>/trials/<trial id>``) through ``run(cfg)``, reporting the validation loss at each
evaluation. ASHA stops the worst trials early; PBT restarts the worst from a better trial's
checkpoint (fmtrain's own checkpoint directory, handed over by Ray Tune) with perturbed values;
Optuna's TPE proposes values from the results so far.

A trial trains as the launcher says: one rank in the trial's Ray process (``launcher=local``), N
ranks through the local launcher in a child process (``launcher.nproc=N``), or a Slurm job of its
own (``launcher=slurm``). The last two are followed through their ``metrics.jsonl``; when the trial
ends first (ASHA stops it), the driver stops its run: SIGTERM, or scancel.

The sweep directory holds ``results.csv`` (one row per trial, best first: its values, metric,
steps, status), ``best_overrides.yaml``, ``best_command.txt``, ``tune.png`` (learning curves, and the
final metric against each hyper-parameter) and Ray Tune's state under ``ray/``, from which
``tune.resume=true`` continues an interrupted sweep without rerunning finished trials.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

from fmtrain.config import ConfigError, TrainConfig, TuneConfig
from launch.ray import init_options, ray_environment
from launch.tune.results import write_results
from launch.tune.space import Distribution, apply_overrides, check_trials, check_values, parse_space
from launch.tune.trials import _stop_runs_callback, _trial, stop_trial_run

__all__ = ["apply_overrides", "check_trials", "check_values", "parse_space", "run_sweep", "stop_trial_run"]

log = logging.getLogger("fmtrain.launch")


def _scheduler(tune_cfg: TuneConfig, space: dict[str, Distribution], max_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if tune_cfg.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            grace_period=tune_cfg.grace_period,
            reduction_factor=tune_cfg.reduction_factor,
            max_t=max_steps,
        )
    if tune_cfg.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=tune_cfg.perturbation_interval,
            hyperparam_mutations={k: d.values() or d.to_ray() for k, d in space.items()},
            synch=tune_cfg.synch,
        )
    return FIFOScheduler()


def _search(tune_cfg: TuneConfig, seed: int) -> Any:
    """The search, seeded: the same sweep proposes the same values (and PBT perturbs them alike)."""
    import random

    import numpy as np

    # PBT's explore draws from Python's and NumPy's global generators, in this (the driver's) process.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if tune_cfg.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=tune_cfg.max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=tune_cfg.max_concurrent, random_state=seed)


def run_sweep(cfg: TrainConfig, argv: list[str], base_overrides: list[str]) -> Path:
    """Run (or resume) the sweep described by ``cfg.tune`` into ``cfg.run_dir``; return that folder."""
    os.environ.update(ray_environment())
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    from fmtrain.config import to_yaml

    tune_cfg = cfg.tune
    space = parse_space(tune_cfg)
    check_trials(cfg)
    lc = cfg.launcher
    sweep_dir = Path(cfg.run_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = sweep_dir / "ray"
    base_yaml = to_yaml(cfg)
    (sweep_dir / "config.yaml").write_text(base_yaml)
    (sweep_dir / "command.txt").write_text(shlex.join(argv) + "\n")
    evals = math.ceil(cfg.trainer.max_steps / cfg.trainer.eval_interval)
    code_dir = ""
    if lc.name == "slurm" and lc.code_snapshot:
        from launch.slurm import snapshot_code

        code_dir = str(snapshot_code(sweep_dir / "code"))  # every trial's job runs this copy
    # A trial on this node takes its ranks' CPUs; one that follows a Slurm job needs next to none
    # (tune.max_concurrent says how many jobs are in the queue at once).
    trial_resources = {"cpu": tune_cfg.cpus_per_trial * lc.nproc if lc.name == "local" else 0.01}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(**init_options(tune_cfg.address, object_store_mb=256))  # trials, and the ranks they start, at nice 0
    try:
        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
        if trial_resources["cpu"] > cluster_cpus:  # Ray Tune would leave every trial pending
            raise ConfigError(
                "tune.cpus_per_trial",
                tune_cfg.cpus_per_trial,
                f"a trial of launcher.nproc={lc.nproc} rank(s) x {tune_cfg.cpus_per_trial:g} CPU needs "
                f"{trial_resources['cpu']:g} CPUs, but the Ray cluster has {cluster_cpus:g}",
            )
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial,
                base_yaml=base_yaml,
                sweep_dir=str(sweep_dir),
                hand_over_checkpoints=tune_cfg.scheduler == "pbt",
                code_dir=code_dir,
            ),
            trial_resources,
        )
        if tune_cfg.resume and tune.Tuner.can_restore(str(storage / "sweep")):
            tuner = tune.Tuner.restore(str(storage / "sweep"), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            param_space = {key: dist.to_ray() for key, dist in space.items()}
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=tune_cfg.metric,
                    mode=tune_cfg.mode,
                    num_samples=tune_cfg.num_samples,
                    scheduler=_scheduler(tune_cfg, space, evals),
                    search_alg=_search(tune_cfg, cfg.seed),  # bounds the trials at once (tune.max_concurrent)
                    # A stopped trial that follows a run elsewhere ends in its `finally` (which stops the
                    # run); its actor is not reused while that may still be going on.
                    reuse_actors=lc.name == "local" and lc.nproc == 1,
                ),
                run_config=tune.RunConfig(
                    name="sweep",
                    storage_path=str(storage),
                    verbose=0,
                    callbacks=[_stop_runs_callback(sweep_dir, cfg.trainer.max_steps)],
                    # PBT: every pointer kept (a few bytes each), so an exploit never finds its source gone.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None if tune_cfg.scheduler == "pbt" else 2),
                ),
            )
        grid = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
        if lc.name == "slurm" or lc.nproc > 1:
            _stop_left_runs(sweep_dir, cfg.trainer.max_steps)
    write_results(sweep_dir, grid, list(space), tune_cfg, base_overrides, cfg.trainer.max_steps)
    return sweep_dir


def _stop_left_runs(sweep_dir: Path, max_steps: int) -> None:
    """The sweep is over, or its driver was interrupted: no trial's run outlives it unless it is
    only finishing (past its last evaluation)."""
    from fmtrain.metrics import read_jsonl

    for job_file in sorted(sweep_dir.glob("trials/*/job.json")):
        metrics_file = job_file.parent / "metrics.jsonl"
        steps = [r["step"] for r in read_jsonl(metrics_file) if "val_loss" in r] if metrics_file.is_file() else []
        if max(steps, default=0) < max_steps:
            stop_trial_run(job_file.parent, max(steps, default=0))
