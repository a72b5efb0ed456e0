"""fmtrain's DDP vs ``accelerate launch`` on 2 CPU processes: same model, batch, data and steps.

    python bench/accelerate_ddp.py [--steps 40] [--rounds 3]

Rounds alternate the two in one run. Both get one OpenMP thread per rank (fmtrain's default on 2
cores; set for accelerate explicitly, whose default oversubscribes the cores). Tokens/s after a
5-step warm-up. Goal: fmtrain / accelerate >= 1.05.

Each framework runs its defaults: fmtrain's fused AdamW kernel (``optim.implementation``), accelerate's
example loop with torch's default (foreach). The model, batch, data, clipping and DDP are the same, so
the forward and backward take the same time in both; ``ceiling`` is the ratio fmtrain would reach if
everything else in its step (optimizer, clipping, bookkeeping) took no time at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    ours, theirs, shares = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            out = Path(tmp) / f"accelerate{round_}.json"
            command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
            command += [
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                str(HERE / "accelerate_train.py"),
                str(out),
                str(args.steps),
            ]
            subprocess.run(command, check=True, capture_output=True, env=env)
            measured = json.loads(out.read_text())
            theirs.append(measured["tokens_per_s"])
            shares.append(measured["forward_backward_share"])
            run_dir = Path(tmp) / f"fmtrain{round_}"
            steps = [
                f"trainer.max_steps={args.steps}",
                f"trainer.eval_interval={args.steps}",
                f"checkpoint.interval={args.steps}",
            ]
            subprocess.run(
                [
                    str(BIN / "fmtrain"),
                    "train",
                    f"run_dir={run_dir}",
                    "launcher.nproc=2",
                    "strategy=ddp",
                    "precision=fp32",  # accelerate's --mixed_precision no
                    "trainer.plot=false",
                    *steps,
                ],
                check=True,
                capture_output=True,
                env=env,
            )
            ours.append(common.fmtrain_throughput(run_dir, warmup=5))
            print(f"round {round_}: accelerate {theirs[-1]:,.0f} tok/s, fmtrain {ours[-1]:,.0f} tok/s")
    ratio = common.median(ours) / common.median(theirs)
    ceiling = 1 / common.median(shares)
    path = common.write(
        "accelerate_ddp",
        {
            "processes": 2,
            "steps": args.steps,
            "accelerate_tokens_per_s": theirs,
            "fmtrain_tokens_per_s": ours,
            "ratio": ratio,
            "goal": ">= 1.05",
            "accelerate_forward_backward_share": shares,
            "ceiling": ceiling,
        },
    )
    print(f"fmtrain / accelerate DDP throughput: {ratio:.3f} (ceiling {ceiling:.3f})  ->  {path}")


if __name__ == "__main__":
    main()
