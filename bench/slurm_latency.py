"""Submit-to-first-step latency on a real Slurm cluster: fmtrain vs a bare ``sbatch --wrap``.

    python bench/slurm_latency.py [--rounds 3]

Brings up its own 1-node dev cluster (slurm/dev-cluster.sh, root) on separate ports and takes it
down at the end. Both sides train the same config (the default tiny model, 1 task) and are timed
from just before the submitting process starts to the wall-clock time of step 1 in metrics.jsonl:

- fmtrain: ``fmtrain train launcher=slurm ...`` (validation, sinfo check, code snapshot, submitit's
  pickled task, Slurm-to-torch environment);
- bare: ``sbatch --wrap 'python -m fmtrain.worker config.yaml'`` with the config fmtrain resolved,
  nothing else.

Rounds alternate between the two; the medians and their difference go to results/slurm_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
FMTRAIN = str(Path(sys.executable).parent / "fmtrain")
OVERRIDES = [
    "trainer.max_steps=3",
    "trainer.eval_interval=3",
    "checkpoint.interval=3",
    "trainer.plot=false",
    "trainer.progress=false",
]


def first_step_time(run_dir: Path, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                record = json.loads(line)
                if record.get("step") == 1 and "loss" in record:
                    return record["time"]
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir}: no first step in {timeout} s")


def wait_idle(env: dict[str, str]) -> None:
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "cluster"
        env = dict(os.environ, FMTRAIN_SLURM_HOME=str(home), FMTRAIN_SLURM_PORT="18800")
        subprocess.run([str(ROOT / "slurm" / "dev-cluster.sh"), "up", "--nodes", "1"], env=env, check=True)
        env["SLURM_CONF"] = str(home / "etc" / "slurm.conf")
        try:
            rows: dict[str, list[float]] = {"fmtrain": [], "bare_sbatch": []}
            for round_ in range(args.rounds):
                run_dir = Path(tmp) / f"fmtrain{round_}"
                started = time.time()
                subprocess.run(
                    [FMTRAIN, "train", "launcher=slurm", f"run_dir={run_dir}", *OVERRIDES],
                    env=dict(env, FMTRAIN_INVOKED_AT=repr(started)),
                    check=True,
                    capture_output=True,
                )
                rows["fmtrain"].append(first_step_time(run_dir) - started)
                wait_idle(env)

                bare_dir = Path(tmp) / f"bare{round_}"
                bare_dir.mkdir()
                config = (run_dir / "config.yaml").read_text().replace(str(run_dir), str(bare_dir))
                (bare_dir / "config.yaml").write_text(config)
                command = f"{sys.executable} -m fmtrain.worker {bare_dir / 'config.yaml'}"
                started = time.time()
                subprocess.run(
                    ["sbatch", "--parsable", f"--output={bare_dir}/slurm.out", "--wrap", command],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                rows["bare_sbatch"].append(first_step_time(bare_dir) - started)
                wait_idle(env)
                print(f"round {round_}: fmtrain {rows['fmtrain'][-1]:.2f} s, bare sbatch {rows['bare_sbatch'][-1]:.2f} s")
        finally:
            subprocess.run([str(ROOT / "slurm" / "dev-cluster.sh"), "down"], env=env, check=True)
    medians = {name: statistics.median(values) for name, values in rows.items()}
    result = {
        "rounds": args.rounds,
        "seconds": rows,
        "median_s": medians,
        "difference_s": medians["fmtrain"] - medians["bare_sbatch"],
        "goal_s": 3.0,
    }
    path = common.write("slurm_latency", result)
    fm, bare = medians["fmtrain"], medians["bare_sbatch"]
    print(f"fmtrain {fm:.2f} s vs bare sbatch {bare:.2f} s: +{result['difference_s']:.2f} s -> {path}")


if __name__ == "__main__":
    main()
