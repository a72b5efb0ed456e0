"""``fmtrain tune``: Ray Tune over fmtrain's config; every trial is a real fmtrain run.

    fmtrain tune tune=asha tune.num_samples=8 trainer.max_steps=200 trainer.eval_interval=20
    fmtrain tune tune=optuna 'tune.space={optim.lr: "loguniform(1e-4, 1e-2)", model.n_layers: "choice([2, 4])"}'
    fmtrain tune tune=pbt ...        fmtrain tune tune=grid ...        fmtrain tune ... tune.resume=true

The search space lives in the config (``tune.space``: key -> distribution). Each trial applies its
values to the composed config, is validated like any run, and trains in its own run directory
(``<sweep>/trials/<trial id>``) through ``run(cfg)``, reporting the validation loss at each
evaluation. ASHA stops the worst trials early; PBT restarts the worst from a better trial's
checkpoint (fmtrain's own checkpoint directory, handed over by Ray Tune) with perturbed values;
Optuna's TPE proposes values from the results so far.

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

    from fmtrain.config import to_config, validate

    node = OmegaConf.structured(base)
    for key, value in values.items():
        OmegaConf.update(node, key, value, merge=False)
    cfg = to_config(node)
    validate(cfg, world_size=cfg.launcher.nproc)
    return cfg


def _trial(params: dict[str, Any], base_yaml: str, sweep_dir: str, hand_over_checkpoints: bool) -> None:
    """One Ray Tune trial: an fmtrain run in its own directory, reporting after each evaluation."""
    from omegaconf import OmegaConf
    from ray import tune

    from fmtrain.config import to_config, to_yaml
    from fmtrain.trainer import run

    base = to_config(OmegaConf.create(base_yaml))
    cfg = apply_overrides(base, params)
    trial_dir = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    cfg.run_dir = str(trial_dir)
    cfg.trainer.progress = False
    if hand_over_checkpoints:
        # PBT may hand any reported checkpoint to another trial later: keep them all (Ray keeps
        # only pointers to them, so nothing is stored twice).
        cfg.checkpoint.keep_last = max(cfg.checkpoint.keep_last, math.ceil(cfg.trainer.max_steps / cfg.checkpoint.interval) + 1)
    inherited = tune.get_checkpoint()  # PBT: a better trial's checkpoint to continue from
    if inherited is not None:
        with inherited.as_directory() as folder:
            pointer = json.loads((Path(folder) / "pointer.json").read_text())
        step_dir = trial_dir / "checkpoints" / pointer["name"]
        if Path(pointer["path"]).resolve() != step_dir.resolve():
            shutil.rmtree(step_dir, ignore_errors=True)
            shutil.copytree(pointer["path"], step_dir)
        cfg.trainer.resume = str(step_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "config.yaml").write_text(to_yaml(cfg))
    (trial_dir / "params.json").write_text(json.dumps(params))

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
        )
    return FIFOScheduler()


def _search(tune_cfg: TuneConfig) -> Any:
    if tune_cfg.search != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch()


def run_sweep(cfg: TrainConfig, argv: list[str], base_overrides: list[str]) -> Path:
    """Run (or resume) the sweep described by ``cfg.tune`` into ``cfg.run_dir``; return that folder."""
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    from fmtrain.config import to_yaml

    tune_cfg = cfg.tune
    space = parse_space(tune_cfg)
    sweep_dir = Path(cfg.run_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = sweep_dir / "ray"
    base_yaml = to_yaml(cfg)
    (sweep_dir / "config.yaml").write_text(base_yaml)
    (sweep_dir / "command.txt").write_text(shlex.join(argv) + "\n")
    evals = math.ceil(cfg.trainer.max_steps / cfg.trainer.eval_interval)
    started_here = not ray.is_initialized()
    if started_here:
        options: dict[str, Any] = {"address": tune_cfg.address, "logging_level": logging.WARNING, "log_to_driver": False}
        if tune_cfg.address is None:
            options |= {"include_dashboard": False, "object_store_memory": 256 * 1024 * 1024}
        ray.init(**options)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial, base_yaml=base_yaml, sweep_dir=str(sweep_dir), hand_over_checkpoints=tune_cfg.scheduler == "pbt"
            ),
            {"cpu": tune_cfg.cpus_per_trial},
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
                    search_alg=_search(tune_cfg),
                    max_concurrent_trials=tune_cfg.max_concurrent,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name="sweep",
                    storage_path=str(storage),
                    verbose=0,
                    # PBT: every pointer kept (a few bytes each), so an exploit never finds its source gone.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None if tune_cfg.scheduler == "pbt" else 2),
                ),
            )
        grid = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    write_results(sweep_dir, grid, list(space), tune_cfg, base_overrides, cfg.trainer.max_steps)
    return sweep_dir


def write_results(
    sweep_dir: Path, grid: Any, keys: list[str], tune_cfg: TuneConfig, base_overrides: list[str], max_steps: int
) -> None:
    """results.csv (best first), best_overrides.yaml, best_command.txt and tune.png."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_dir = sweep_dir / "trials" / str(metrics.get("trial_id", ""))
        params = result.config or {}
        history = result.metrics_dataframe
        losses = history["val_loss"].dropna().tolist() if history is not None and "val_loss" in history else []
        steps = int(metrics.get("step", 0))
        rows.append(
            {
                "trial": trial_dir.name,
                **{key: params.get(key) for key in keys},
                tune_cfg.metric: (min(losses) if tune_cfg.mode == "min" else max(losses)) if losses else None,
                "final_" + tune_cfg.metric: losses[-1] if losses else None,
                "steps": steps,
                "evaluations": len(losses),
                "status": "error" if result.error else "completed" if steps >= max_steps else "stopped early",
                "run_dir": str(trial_dir) if trial_dir.name else "",
            }
        )
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
