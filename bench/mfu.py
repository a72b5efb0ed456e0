"""MFU of fmtrain runs against the measured matmul peak of this CPU in the run's own dtype.

    python bench/mfu.py [--steps 30]

Each model runs twice: at the default precision (``auto``: bf16 autocast on a CPU with native bf16
matmuls, else fp32) and in fp32. The peak of a dtype is the best of several square matmuls
(1024..4096) with every thread of the process, taken over repeated probes; where a run's achieved
rate would exceed it, it is probed again (up to three times) before MFU is computed, and a peak
still below the run is reported as such. Where a step's time goes is ``bench/step.py``'s profile.
Goal: >= 70%.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import torch

import fmtrain
from fmtrain.models.llama import Transformer

MODELS = {"tiny (default)": [], "small": ["model=small", "data.seq_len=512", "trainer.global_batch_size=8"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, probes: int = 3) -> float:
    """The best FLOP/s of square matmuls of a few sizes, over ``probes`` passes."""
    best = 0.0
    for _ in range(probes):
        for n in (1024, 2048, 4096):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)
            reps = max(1, int(4e9 / n**3))
            for _ in range(2):
                start = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b)
                best = max(best, reps * 2 * n**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    peaks: dict[str, float] = {}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in MODELS.items():
            for precision in ("auto", "fp32"):
                overrides = [
                    f"trainer.max_steps={args.steps}",
                    f"trainer.eval_interval={args.steps}",
                    f"checkpoint.interval={args.steps}",
                    f"precision={precision}",
                    *extra,
                ]
                cfg = common.config(Path(tmp) / f"{name.split()[0]}-{precision}", overrides)
                dtype = cfg.precision.name  # auto resolved as the run resolves it
                if dtype not in peaks:
                    peaks[dtype] = matmul_peak(DTYPES[dtype])
                    print(f"measured {dtype} matmul peak: {peaks[dtype] / 1e9:.1f} GFLOP/s", flush=True)
                cfg.trainer.peak_flops = peaks[dtype]
                fmtrain.run(cfg)
                tokens_per_s = common.fmtrain_throughput(Path(cfg.run_dir), warmup=5)
                with torch.device("meta"):
                    flops_per_token = Transformer(cfg.model).flops_per_token(cfg.data.seq_len)
                achieved = flops_per_token * tokens_per_s
                for _ in range(3):
                    if achieved <= peaks[dtype]:
                        break
                    peaks[dtype] = max(peaks[dtype], matmul_peak(DTYPES[dtype]))
                label = f"{name}, {'default: ' if precision == 'auto' else ''}{dtype}"
                rows[label] = {
                    "overrides": extra,
                    "precision": dtype,
                    "tokens_per_s": tokens_per_s,
                    "flops_per_token": flops_per_token,
                    "achieved_gflops": achieved / 1e9,
                    "peak_gflops": peaks[dtype] / 1e9,
                    "mfu": achieved / peaks[dtype],
                    "peak_below_achieved": achieved > peaks[dtype],
                }
                print(f"{label}: MFU {rows[label]['mfu']:.1%}, {tokens_per_s:,.0f} tok/s", flush=True)
    path = common.write("mfu", {"peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "models": rows, "goal": ">= 0.70"})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
