"""MFU of fmtrain runs against the measured matmul peak of this CPU, and where a step's time goes.

    python bench/mfu.py [--steps 30]

The peak is the best of square matmuls (512..2048) in the run's dtype with every thread of the
process. A step is profiled (bare loop, same model) and its operator time grouped into matmuls,
attention, the optimizer and the rest. Goal: >= 50% for the benchmark model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common
import torch
import torch.nn.functional as F

import fmtrain
from fmtrain.models.llama import Transformer

MODELS = {"tiny (default)": [], "small": ["model=small", "data.seq_len=512", "trainer.global_batch_size=8"]}
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "attention"),
    "optimizer": ("_foreach", "adamw", "Optimizer", "lerp", "addcdiv", "addcmul"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),
}


def matmul_peak(dtype: torch.dtype) -> float:
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        for _ in range(3):
            start = time.perf_counter()
            reps = max(1, int(2e9 / n**3))
            for _ in range(reps):
                torch.mm(a, b)
            best = max(best, reps * 2 * n**3 / (time.perf_counter() - start))
    return best


def time_breakdown(cfg) -> dict[str, float]:
    model = common.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (cfg.trainer.global_batch_size, cfg.data.seq_len + 1))

    def step() -> None:
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        group = next((g for g, keys in GROUPS.items() if any(k in event.key for k in keys)), "other")
        totals[group] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {g: round(t / whole, 3) for g, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    peak = matmul_peak(torch.float32)
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in MODELS.items():
            overrides = [
                f"trainer.max_steps={args.steps}",
                f"trainer.eval_interval={args.steps}",
                f"checkpoint.interval={args.steps}",
                f"trainer.peak_flops={peak}",
                *extra,
            ]
            cfg = common.config(Path(tmp) / name.split()[0], overrides)
            fmtrain.run(cfg)
            tokens_per_s = common.fmtrain_throughput(Path(cfg.run_dir), warmup=5)
            with torch.device("meta"):
                flops_per_token = Transformer(cfg.model).flops_per_token(cfg.data.seq_len)
            rows[name] = {
                "overrides": extra,
                "tokens_per_s": tokens_per_s,
                "flops_per_token": flops_per_token,
                "achieved_gflops": flops_per_token * tokens_per_s / 1e9,
                "mfu": flops_per_token * tokens_per_s / peak,
                "time_share": time_breakdown(cfg),
            }
            print(f"{name}: MFU {rows[name]['mfu']:.1%}, {tokens_per_s:,.0f} tok/s, time {rows[name]['time_share']}")
    path = common.write("mfu", {"peak_gflops_fp32": peak / 1e9, "models": rows, "goal": ">= 0.50"})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
