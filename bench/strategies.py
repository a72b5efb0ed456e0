"""Strategy x precision on 2 CPU ranks: tokens/s and state_bytes relative to DDP fp32, in one run.

    python bench/strategies.py [--steps 30]

Each cell is a real ``fmtrain train`` run of the default model on 2 processes. Tokens/s is measured
by the wall clock between step records after a warm-up; state_bytes is what each rank holds
(parameters + gradients + optimizer state). On 2 cores, more ranks are no faster: the table shows
what each strategy costs and saves, not a speed-up.
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

STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "zero1": ["strategy=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy=deepspeed", "strategy.zero_stage=3"],
    "tp": ["strategy=tp"],
    "tp+sp": ["strategy=tp", "strategy.sequence_parallel=true"],
}
CELLS = [(s, p) for s in STRATEGIES for p in ("fp32", "bf16", "fp16")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    fmtrain = str(Path(sys.executable).parent / "fmtrain")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, precision in CELLS:
            run_dir = Path(tmp) / f"{strategy}-{precision}"
            command = [
                fmtrain,
                "train",
                f"run_dir={run_dir}",
                *STRATEGIES[strategy],
                f"precision={precision}",
                "launcher.nproc=2",
            ]
            command += [
                f"trainer.max_steps={args.steps}",
                f"trainer.eval_interval={args.steps}",
                f"checkpoint.interval={args.steps}",
            ]
            subprocess.run([*command, "trainer.plot=false"], check=True, capture_output=True, env=dict(os.environ))
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rows[f"{strategy} {precision}"] = {
                "tokens_per_s": common.fmtrain_throughput(run_dir, warmup=5),
                "state_bytes": [r["state_bytes"] for r in records if "state_bytes" in r][-1],  # steady state
                "optim_state_bytes": [r["optim_state_bytes"] for r in records if "optim_state_bytes" in r][-1],
                "final_loss": [r["loss"] for r in records if "loss" in r][-1],
            }
            print(strategy, precision, rows[f"{strategy} {precision}"])
    base = rows["ddp fp32"]
    for row in rows.values():
        row["tokens_per_s_vs_ddp_fp32"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["state_bytes_vs_ddp"] = row["state_bytes"] / base["state_bytes"]
        row["optim_state_bytes_vs_ddp"] = row["optim_state_bytes"] / base["optim_state_bytes"]
    path = common.write("strategies", {"ranks": 2, "steps": args.steps, "cells": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
