"""What a finished sweep leaves: ``results.csv`` (best first), ``best_overrides.yaml``,
``best_command.txt`` and ``tune.png``."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path
from typing import Any

from fmtrain.config import TuneConfig


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
