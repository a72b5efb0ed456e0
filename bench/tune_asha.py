"""ASHA vs a full grid over the same learning-rate range: compute used and best validation loss.

    python bench/tune_asha.py [--trials 8] [--steps 300]

Both sweeps are real ``fmtrain tune`` runs of a 2-layer, 64-wide model in one loopback-only network
namespace, one after the other: ``tune=asha`` with N random learning rates, and ``tune=grid`` with N
log-spaced ones over the same range, every trial run to the end. Compute is counted in trial-steps
(the steps each trial trained, from results.csv) and in wall seconds.
Goal: ASHA uses <= 35% of the grid's compute for a best validation loss within 2% of the grid's.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from netns import loopback_namespace, run_in

FMTRAIN = str(Path(sys.executable).parent / "fmtrain")
LOW, HIGH = 3e-4, 3e-2
# A model small enough that 16 trials take minutes on 2 cores; the comparison is of the search.
MODEL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "data.seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.plot=false",
]


def sweep(prefix: list[str], sweep_dir: Path, env: dict[str, str], steps: int, overrides: list[str]) -> dict:
    common_args = [*MODEL, f"trainer.max_steps={steps}", f"trainer.eval_interval={steps // 10}", f"checkpoint.interval={steps}"]
    started = time.perf_counter()
    subprocess.run(
        [*prefix, FMTRAIN, "tune", f"run_dir={sweep_dir}", *common_args, *overrides], env=env, check=True, capture_output=True
    )
    seconds = time.perf_counter() - started
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "trials": len(rows),
        "trial_steps": sum(int(r["steps"]) for r in rows),
        "wall_s": seconds,
        "best_val_loss": min(float(r["val_loss"]) for r in rows),
        "best_lr": float(rows[0]["optim.lr"]),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    grid = [LOW * (HIGH / LOW) ** (i / (args.trials - 1)) for i in range(args.trials)]
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="fmbench-") as tmp, loopback_namespace() as namespace:
        prefix = run_in(namespace)
        env = dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        asha = sweep(
            prefix,
            Path(tmp) / "asha",
            env,
            args.steps,
            ["tune=asha", f"tune.num_samples={args.trials}", f'tune.space={{optim.lr: "loguniform({LOW}, {HIGH})"}}'],
        )
        print("asha", asha)
        full = sweep(
            prefix,
            Path(tmp) / "grid",
            env,
            args.steps,
            ["tune=grid", f'tune.space={{optim.lr: "grid([{", ".join(f"{v:.3g}" for v in grid)}])"}}'],
        )
        print("grid", full)
    result = {
        "trials": args.trials,
        "steps_per_trial": args.steps,
        "asha": asha,
        "grid": full,
        "compute_ratio_trial_steps": asha["trial_steps"] / full["trial_steps"],
        "compute_ratio_wall": asha["wall_s"] / full["wall_s"],
        "best_loss_ratio": asha["best_val_loss"] / full["best_val_loss"],
        "goal": "compute_ratio <= 0.35 and best_loss_ratio <= 1.02",
    }
    assert math.isfinite(result["best_loss_ratio"])
    path = common.write("tune_asha", result)
    print(
        f"ASHA: {result['compute_ratio_trial_steps']:.2f} of the grid's trial-steps, {result['compute_ratio_wall']:.2f} of its "
        f"wall time; best val_loss {asha['best_val_loss']:.4f} vs grid {full['best_val_loss']:.4f} -> {path}"
    )


if __name__ == "__main__":
    main()
