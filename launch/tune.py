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

import ast
import csv
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from fmtrain.config import ConfigError, TrainConfig, TuneConfig, typing_hints

log = logging.getLogger("fmtrain.launch")

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
SCHEDULERS = ("asha", "pbt", "fifo")
SEARCHES = ("random", "grid", "optuna")
METRICS = ("val_loss",)


@dataclasses.dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple[Any, ...]

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args[0]))
        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*self.args)

    def values(self) -> list[Any]:
        """For PBT's explore step: the values a trial may move to (None: continuous)."""
        return list(self.args[0]) if self.kind in ("choice", "grid") else []


def parse_distribution(key: str, text: str) -> Distribution:
    """``loguniform(1e-4, 1e-2)`` -> Distribution; refuses what Ray Tune could not sample."""
    match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", str(text), re.S)
    if not match or match.group(1) not in DISTRIBUTIONS:
        raise ConfigError(f"tune.space.{key}", text, f"must be one of {', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
    kind = match.group(1)
    try:
        args = ast.literal_eval(f"({match.group(2)},)")
    except (ValueError, SyntaxError) as error:
        raise ConfigError(f"tune.space.{key}", text, f"cannot read the arguments: {error}") from error
    if kind in ("choice", "grid"):
        if len(args) != 1 or not isinstance(args[0], list | tuple) or not args[0]:
            raise ConfigError(f"tune.space.{key}", text, f"{kind} takes one non-empty list, e.g. {kind}([1e-3, 3e-3])")
    else:
        if len(args) != 2 or not all(isinstance(a, int | float) for a in args) or not args[0] < args[1]:
            raise ConfigError(f"tune.space.{key}", text, f"{kind} takes two numbers low < high, e.g. {kind}(1e-4, 1e-2)")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"tune.space.{key}", text, "loguniform needs low > 0")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"tune.space.{key}", text, "randint takes two integers")
    return Distribution(kind, tuple(args))


def _field_type(key: str) -> Any:
    """The schema type of a dotted config key, or ConfigError naming the valid keys."""
    owner: Any = TrainConfig
    parts = key.split(".")
    for index, part in enumerate(parts):
        hints = typing_hints(owner)
        if part not in hints:
            where = ".".join(parts[:index]) or "the top level"
            raise ConfigError(f"tune.space.{key}", "", f"unknown config key; valid keys under {where}: {', '.join(hints)}")
        owner = hints[part]
        if index < len(parts) - 1 and not dataclasses.is_dataclass(owner):
            raise ConfigError(f"tune.space.{key}", "", f"{'.'.join(parts[: index + 1])} has no sub-keys")
    if dataclasses.is_dataclass(owner):
        raise ConfigError(f"tune.space.{key}", "", "names a section, not a value; e.g. optim.lr")
    return owner


def parse_space(tune: TuneConfig) -> dict[str, Distribution]:
    """Check ``tune`` and its space before Ray starts: keys, distributions, scheduler and search."""
    for key, value, choices in (
        ("tune.scheduler", tune.scheduler, SCHEDULERS),
        ("tune.search", tune.search, SEARCHES),
        ("tune.metric", tune.metric, METRICS),
        ("tune.mode", tune.mode, ("min", "max")),
    ):
        if value not in choices:
            raise ConfigError(key, value, f"valid choices are {', '.join(choices)}")
    for key in ("num_samples", "max_concurrent", "grace_period", "reduction_factor", "perturbation_interval"):
        if getattr(tune, key) < 1:
            raise ConfigError(f"tune.{key}", getattr(tune, key), "must be positive")
    if tune.cpus_per_trial <= 0:
        raise ConfigError("tune.cpus_per_trial", tune.cpus_per_trial, "must be positive")
    if not tune.space:
        raise ConfigError(
            "tune.space", {}, "is empty: give at least one key, e.g. tune.space={optim.lr: 'loguniform(1e-4, 1e-2)'}"
        )
    space = {}
    for key, text in flatten(tune.space).items():
        _field_type(key)
        space[key] = parse_distribution(key, text)
    grids = [k for k, d in space.items() if d.kind == "grid"]
    if tune.search == "grid" and len(grids) != len(space):
        raise ConfigError(
            "tune.search",
            "grid",
            f"every tune.space value must be grid([...]); not: {', '.join(sorted(set(space) - set(grids)))}",
        )
    if tune.search == "optuna" and grids:
        raise ConfigError("tune.search", "optuna", f"Optuna samples; grid([...]) is for tune.search=grid ({', '.join(grids)})")
    if tune.scheduler == "pbt" and tune.search == "optuna":
        raise ConfigError("tune.scheduler", "pbt", "PBT explores by itself; use tune.search=random with it")
    return space


def check_trials(cfg: TrainConfig) -> None:
    """How trials run: one rank in the trial's process, N ranks on its node, or a Slurm job each."""
    lc = cfg.launcher
    if lc.name == "ray":
        raise ConfigError(
            "launcher.name", "ray", "the sweep itself runs on Ray; for N ranks per trial use launcher.nproc=N (on the "
            "trial's node) or launcher=slurm (a Slurm job per trial)"
        )  # fmt: skip
    if cfg.tune.scheduler == "pbt" and (lc.name != "local" or lc.nproc > 1):
        raise ConfigError(
            "tune.scheduler", "pbt", "PBT hands checkpoints between trials that train in Ray Tune's own processes: use "
            "launcher=local with launcher.nproc=1"
        )  # fmt: skip


def flatten(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{optim: {lr: d}}`` and ``{"optim.lr": d}`` alike -> ``{"optim.lr": d}``."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """``base`` with dotted keys set to ``values``, type-checked by the schema and validated."""
    from omegaconf import OmegaConf

    from fmtrain.config import to_config
    from fmtrain.validation import validate

    node = OmegaConf.structured(base)
    for key, value in values.items():
        OmegaConf.update(node, key, value, merge=False)
    cfg = to_config(node)
    validate(cfg)
    return cfg


def _trial(params: dict[str, Any], base_yaml: str, sweep_dir: str, hand_over_checkpoints: bool, code_dir: str = "") -> None:
    """One Ray Tune trial: an fmtrain run in its own directory, reporting after each evaluation.

    One rank (``launcher=local``, the default) trains in this process. N ranks
    (``launcher.nproc=N``) are the local launcher in a child process, and ``launcher=slurm`` is a
    Slurm job submitted from here; either is followed through its ``metrics.jsonl`` and stopped
    (SIGTERM, scancel) when the trial ends first: stopped by the scheduler, or failed."""
    from ray import tune

    from fmtrain.config import to_yaml

    trial_dir = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)  # first: a trial whose values fail validation has its row too
    cfg = _trial_config(params, base_yaml, trial_dir)
    if hand_over_checkpoints:
        # PBT may hand any reported checkpoint to another trial later: keep them all (Ray keeps
        # only pointers to them, so nothing is stored twice).
        cfg.checkpoint.keep_last = max(cfg.checkpoint.keep_last, math.ceil(cfg.trainer.max_steps / cfg.checkpoint.interval) + 1)
    inherited = tune.get_checkpoint()  # PBT: a better trial's checkpoint to continue from
    if inherited is not None:
        with inherited.as_directory() as folder:
            pointer = json.loads((Path(folder) / "pointer.json").read_text())
        step_dir = trial_dir / "checkpoints" / pointer["name"]
        source = Path(pointer["path"]).resolve()
        if source != step_dir.resolve():
            shutil.rmtree(step_dir, ignore_errors=True)
            shutil.copytree(source, step_dir)
            # PBT's exploit: this trial goes on from another trial's checkpoint with new values (results.csv says so).
            note = {"from_trial": source.parent.parent.name, "checkpoint": pointer["name"], "params": params}
            with open(trial_dir / "exploits.jsonl", "a") as f:
                f.write(json.dumps(note) + "\n")
        cfg.trainer.resume = str(step_dir)
    (trial_dir / "config.yaml").write_text(to_yaml(cfg))
    (trial_dir / "params.json").write_text(json.dumps(params))
    if cfg.launcher.name == "slurm":
        _follow(_SlurmTrialJob.submit(cfg, Path(code_dir) if code_dir else None), trial_dir, cfg.trainer.max_steps)
    elif cfg.launcher.nproc > 1:
        _follow(_LocalTrialJob.start(trial_dir, cfg.tune.cpus_per_trial), trial_dir, cfg.trainer.max_steps)
    else:
        _run_here(cfg, hand_over_checkpoints)


def _trial_config(params: dict[str, Any], base_yaml: str, trial_dir: Path) -> TrainConfig:
    from omegaconf import OmegaConf

    from fmtrain.config import to_config

    cfg = apply_overrides(to_config(OmegaConf.create(base_yaml)), params)
    cfg.run_dir = str(trial_dir)
    cfg.trainer.progress = False
    return cfg


def _run_here(cfg: TrainConfig, hand_over_checkpoints: bool) -> None:
    """The trial's run in this process; checkpoints reported as pointers for PBT to hand over."""
    from ray import tune

    from fmtrain.trainer import run

    def report(step: int, val_loss: float, checkpoint: Path | None) -> None:
        metrics = {"val_loss": val_loss, "step": step}
        if checkpoint is None or not hand_over_checkpoints:
            tune.report(metrics)
            return
        # Hand Ray Tune a pointer to fmtrain's checkpoint (not a copy of it): PBT copies it on exploit.
        import tempfile

        from ray.tune import Checkpoint

        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "pointer.json").write_text(json.dumps({"name": checkpoint.name, "path": str(checkpoint)}))
            tune.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    run(cfg, on_eval=report)


def _follow(job: _LocalTrialJob | _SlurmTrialJob, trial_dir: Path, max_steps: int, poll_s: float = 1.0) -> None:
    """Report a run that trains elsewhere from its metrics.jsonl; stop it if the trial ends first
    (and say so in ``cancelled.json``). A run can be quicker than the scheduler: one that finished
    before the trial was stopped is left as it is."""
    import time

    from ray import tune

    from fmtrain.metrics import read_jsonl

    metrics_file, reported, reporting, ended = trial_dir / "metrics.jsonl", 0, 0, False
    try:
        while True:
            done = job.done()  # asked before reading: every evaluation written before the end is reported
            for record in read_jsonl(metrics_file) if metrics_file.is_file() else []:
                if "val_loss" in record and record["step"] > reported:
                    try:
                        reporting = record["step"]
                        tune.report({"val_loss": record["val_loss"], "step": record["step"], **job.ids()})
                    except SystemExit:  # how Ray Tune ends a trial that its scheduler stops
                        if record["step"] >= max_steps:  # the last evaluation: the run is saving its end
                            while not job.done():
                                time.sleep(poll_s)
                        raise
                    reported = record["step"]
            if done:
                ended = True
                break
            time.sleep(poll_s)
        job.check()
    finally:
        if not ended and not job.done():  # the driver's _StopRuns does the same, should this actor be gone first
            log.info("trial stopped at step %d before its run ended: stopping %s", reporting, job)
            job.cancel()


@dataclasses.dataclass
class _LocalTrialJob:
    """N ranks on this node: the local launcher (``python -m launch.local``) in a child process."""

    process: Any
    trial_dir: Path

    @classmethod
    def start(cls, trial_dir: Path, cpus_per_rank: float) -> _LocalTrialJob:
        import subprocess
        import sys

        _end_earlier_job(trial_dir)
        log_file = open(trial_dir / "launcher.log", "ab")  # noqa: SIM115  (the child's; closed with it)
        command = [sys.executable, "-m", "launch.local", str(trial_dir / "config.yaml")]
        # Ray sets the trial's whole CPU count as OMP_NUM_THREADS; each rank gets its share.
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, int(cpus_per_rank))))
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log_file.close()
        return cls(process, trial_dir)

    def ids(self) -> dict[str, Any]:
        return {"pid": self.process.pid}

    def done(self) -> bool:
        return self.process.poll() is not None

    def check(self) -> None:
        if self.process.returncode != 0:
            tail = (self.trial_dir / "launcher.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the trial's run exited with code {self.process.returncode}:\n{tail}")

    def cancel(self) -> None:
        """SIGTERM: every rank saves and exits; SIGKILL to the process group if it has not after 60 s."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclasses.dataclass
class _SlurmTrialJob:
    """The trial as a Slurm job, submitted through the Slurm launcher."""

    job: Any  # launch.slurm.SlurmJob
    job_id: str
    state: str | None = None  # Slurm's, as of the last done()

    @classmethod
    def submit(cls, cfg: TrainConfig, code_dir: Path | None) -> _SlurmTrialJob:
        from launch.slurm import SlurmLauncher
        from launch.spec import RunSpec

        trial_dir = Path(cfg.run_dir)
        _end_earlier_job(trial_dir)
        spec = RunSpec(cfg, trial_dir, argv=["fmtrain", "tune", f"(trial {trial_dir.name})"])
        job = SlurmLauncher().launch_all([spec], root=trial_dir, code_dir=code_dir)[0]
        return cls(job, job.record.job_id)

    def __str__(self) -> str:
        return f"Slurm job {self.job_id}"

    def ids(self) -> dict[str, Any]:
        return {"slurm_job_id": self.job_id}

    def done(self) -> bool:
        from launch.slurm import TERMINAL, scheduler_state

        self.state = scheduler_state(self.job_id)
        return self.state in TERMINAL

    def check(self) -> None:
        if self.state != "COMPLETED" or not (self.job.run_dir / "result.json").is_file():
            raise RuntimeError(f"the trial's Slurm job {self.job_id} ended {self.state}: see fmtrain logs {self.job.run_dir}")

    def cancel(self) -> None:
        self.job.cancel()


def _running_record(trial_dir: Path) -> Any:
    """The trial's job record if its run is still going (a Slurm job not ended, a live local
    launcher), else None."""
    from launch.launchers import handle_for
    from launch.spec import JobRecord

    if not (trial_dir / "job.json").is_file():
        return None
    return JobRecord.read(trial_dir) if handle_for(trial_dir).running() else None


def _stop_run(trial_dir: Path) -> None:
    """scancel a Slurm job; SIGTERM a local launcher (its ranks save)."""
    from launch.launchers import handle_for

    handle_for(trial_dir).cancel()


def stop_trial_run(trial_dir: Path, stopped_at_step: int) -> bool:
    """Stop the run of a trial that has ended (scheduler stop, error) while its run has not. Noted
    in ``cancelled.json``; returns whether there was anything to stop."""
    record = _running_record(trial_dir)
    if record is None:
        return False
    _stop_run(trial_dir)
    note = {"launcher": record.launcher, "job_id": record.job_id, "pid": record.pid, "stopped_at_step": stopped_at_step}
    (trial_dir / "cancelled.json").write_text(json.dumps(note) + "\n")
    log.info("stopped the %s run of trial %s (step %d)", record.launcher, trial_dir.name, stopped_at_step)
    return True


def _stop_runs_callback(sweep_dir: Path, max_steps: int) -> Any:
    """A Ray Tune callback in the driver: a trial that ends before its run's last evaluation has its
    run stopped, even when the trial's actor is gone before it could do that itself."""
    from ray.tune import Callback

    class StopRuns(Callback):  # type: ignore[misc]
        def _stop(self, trial: Any) -> None:
            step = int((trial.last_result or {}).get("step", 0))
            if step < max_steps:  # a trial stopped at the last evaluation leaves its run to save and end
                stop_trial_run(sweep_dir / "trials" / trial.trial_id, step)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._stop(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._stop(trial)

    return StopRuns()


def _end_earlier_job(trial_dir: Path) -> None:
    """A resumed sweep restarts unfinished trials: a run an earlier driver left going in the same
    directory (a Slurm job; a local launcher, should it have outlived its Ray worker) is stopped (it
    saves on SIGTERM) and waited for, and the new run resumes from it."""
    import time

    record = _running_record(trial_dir)
    if record is None:
        return
    log.info("stopping the %s run %s left by an earlier run of this sweep", record.launcher, record.job_id)
    _stop_run(trial_dir)
    deadline = time.monotonic() + 300
    while _running_record(trial_dir) is not None and time.monotonic() < deadline:
        time.sleep(1.0)


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
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
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
        options: dict[str, Any] = {"address": tune_cfg.address, "logging_level": logging.WARNING, "log_to_driver": False}
        if tune_cfg.address is None:
            options |= {"include_dashboard": False, "object_store_memory": 256 * 1024 * 1024}
        ray.init(**options)
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


def write_results(
    sweep_dir: Path, grid: Any, keys: list[str], tune_cfg: TuneConfig, base_overrides: list[str], max_steps: int
) -> None:
    """results.csv (best first), best_overrides.yaml, best_command.txt and tune.png."""
    rows = [_result_row(result, sweep_dir, keys, tune_cfg, max_steps) for result in grid]
    sign = -1.0 if tune_cfg.mode == "max" else 1.0
    rows.sort(key=lambda r: (r[tune_cfg.metric] is None, sign * float(r[tune_cfg.metric] or 0.0)))
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    if rows and rows[0][tune_cfg.metric] is not None:
        best = {key: rows[0][key] for key in keys}
        (sweep_dir / "best_overrides.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in best.items()))
        command = ["fmtrain", "train", *base_overrides, *(f"{key}={value}" for key, value in best.items())]
        (sweep_dir / "best_command.txt").write_text(shlex.join(command) + "\n")
    _plot(sweep_dir, rows, keys, tune_cfg.metric)


def _result_row(result: Any, sweep_dir: Path, keys: list[str], tune_cfg: TuneConfig, max_steps: int) -> dict[str, Any]:
    """One trial's row: the evaluations it reported to the scheduler (``steps``: the last one), read
    from its run's own ``metrics.jsonl`` (Ray's history of them may be missing), and a status that
    says why, when a trial has no metric."""
    from fmtrain.metrics import read_jsonl

    metrics = result.metrics or {}
    # The trial's folder from Ray's folder of it (``_trial_<id>_<index>_<values>_<date>``): its metrics
    # may have no id (it failed before reporting) or another trial's (after a PBT exploit, Ray
    # carries over the source trial's last result).
    ray_folder = Path(str(result.path)).name
    trial_dir = next((d for d in sweep_dir.glob("trials/*") if ray_folder.startswith(f"_trial_{d.name}_")), None)
    records = read_jsonl(trial_dir / "metrics.jsonl") if trial_dir else []
    # A run followed elsewhere (N ranks, Slurm) may train and evaluate past the report that stopped it.
    reported = int(metrics["step"]) if "step" in metrics else None
    losses = [r[tune_cfg.metric] for r in records if tune_cfg.metric in r and r["step"] <= (reported or 0)]
    steps = reported if reported is not None else max((r["step"] for r in records if "loss" in r), default=0)
    if result.error:
        lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
        status = f"error: {lines[-1] if lines else type(result.error).__name__}"[:300]
    elif not losses and (evaluated := [r["step"] for r in records if tune_cfg.metric in r]):
        status = f"not reported: its run evaluated at steps {evaluated} but Ray Tune received none"
    elif not losses:
        status = f"no {tune_cfg.metric}: ended at step {steps}, before its first evaluation"
    else:
        status = "completed" if steps >= max_steps else "stopped early"
    params = result.config or {}
    row = {
        "trial": trial_dir.name if trial_dir else ray_folder,
        **{key: params.get(key) for key in keys},
        tune_cfg.metric: (min(losses) if tune_cfg.mode == "min" else max(losses)) if losses else None,
        "final_" + tune_cfg.metric: losses[-1] if losses else None,
        "steps": steps,
        "evaluations": len(losses),
        "status": status,
        "run_dir": str(trial_dir) if trial_dir else "",
    }
    if tune_cfg.scheduler == "pbt":  # each exploit: the trial went on from another trial's checkpoint
        exploits = read_jsonl(trial_dir / "exploits.jsonl") if trial_dir else []
        row["continued_from"] = " ".join(f"{e['from_trial']}/{e['checkpoint']}" for e in exploits)
    return row


def _plot(sweep_dir: Path, rows: list[dict[str, Any]], keys: list[str], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmtrain.metrics import read_jsonl

    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(5 * (1 + len(keys)), 4), squeeze=False)
    curves = axes[0][0]
    for row in rows:
        metrics_file = Path(row["run_dir"]) / "metrics.jsonl" if row["run_dir"] else None
        if metrics_file and metrics_file.is_file():
            points = [(r["step"], r["val_loss"]) for r in read_jsonl(metrics_file) if "val_loss" in r]
            if points:
                curves.plot(*zip(*points, strict=True), marker=".", label=row["trial"])
    curves.set(xlabel="step", ylabel=metric, title="learning curves by trial")
    if 0 < len(rows) <= 12:
        curves.legend(fontsize="small")
    for ax, key in zip(axes[0][1:], keys, strict=True):
        points = [(row[key], row[metric]) for row in rows if row[metric] is not None and isinstance(row[key], int | float)]
        if points:
            ax.scatter(*zip(*points, strict=True))
            if all(x > 0 for x, _ in points) and max(x for x, _ in points) / min(x for x, _ in points) > 20:
                ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=f"best {metric}", title=f"{metric} vs {key}")
    fig.tight_layout()
    fig.savefig(sweep_dir / "tune.png", dpi=100)
    plt.close(fig)
