"""Ray launcher start-up overhead vs the local launcher, for the same 2-rank run, in one run.

    python bench/ray_startup.py [--rounds 3]

Wall time of ``fmtrain train launcher=ray launcher.num_workers=2`` (starting a local Ray, Ray
Train's worker group and process group) against ``fmtrain train launcher.nproc=2``, both one
training step of the default model, alternating, inside a loopback-only network namespace.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from netns import loopback_namespace, run_in

FMTRAIN = str(Path(sys.executable).parent / "fmtrain")
RUN = ["trainer.max_steps=1", "trainer.eval_interval=1", "checkpoint.interval=1", "trainer.plot=false", "trainer.progress=false"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="fmbench-") as tmp, loopback_namespace() as namespace:
        prefix = run_in(namespace)
        env = dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        for round_ in range(args.rounds):
            for name, launcher in (("local", ["launcher.nproc=2"]), ("ray", ["launcher=ray", "launcher.num_workers=2"])):
                started = time.perf_counter()
                subprocess.run(
                    [*prefix, FMTRAIN, "train", f"run_dir={tmp}/{name}{round_}", *RUN, *launcher],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                times[name].append(time.perf_counter() - started)
            print(f"round {round_}: local {times['local'][-1]:.1f} s, ray {times['ray'][-1]:.1f} s")
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"rounds": args.rounds, "seconds": times, "median_s": medians, "ratio": medians["ray"] / medians["local"]}
    path = common.write("ray_startup", result)
    print(f"ray {medians['ray']:.1f} s vs local {medians['local']:.1f} s: {result['ratio']:.2f}x -> {path}")


if __name__ == "__main__":
    main()
