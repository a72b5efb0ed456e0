"""fmtrain's training step vs a bare PyTorch loop of the same model, batch and dtype, one process.

    python bench/throughput.py [--steps 40] [--rounds 3] [overrides...]

Rounds alternate bare and fmtrain in one process so that drift of the machine hits both. fmtrain's
tokens/s comes from the wall clock between its step records, so logging, TensorBoard, the progress
display and the stop-flag check all count. Goal: ratio >= 0.98.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

import fmtrain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"trainer.max_steps={args.steps}", f"trainer.eval_interval={args.steps}", f"checkpoint.interval={args.steps}"]
    overrides += args.overrides
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            cfg = common.config(Path(tmp) / f"run{round_}", overrides)
            bare.append(common.bare_loop(cfg, args.steps, args.warmup))
            fmtrain.run(cfg)
            ours.append(common.fmtrain_throughput(Path(cfg.run_dir), args.warmup))
            print(f"round {round_}: bare {bare[-1]:,.0f} tok/s, fmtrain {ours[-1]:,.0f} tok/s")
    ratio = common.median(ours) / common.median(bare)
    path = common.write(
        "throughput",
        {
            "config": overrides,
            "model": cfg.model.name,
            "precision": cfg.precision.name,
            "tokens_per_step": cfg.trainer.global_batch_size * cfg.data.seq_len,
            "bare_tokens_per_s": bare,
            "fmtrain_tokens_per_s": ours,
            "ratio": ratio,
            "goal": ">= 0.98",
        },
    )
    print(f"fmtrain / bare throughput: {ratio:.3f}  ->  {path}")


if __name__ == "__main__":
    main()
