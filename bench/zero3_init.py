"""ZeRO-3 model construction on 2 CPU ranks: built partitioned (deepspeed.zero.Init) vs built whole.

    python bench/zero3_init.py [--dim 1024] [--layers 12]

Each way runs ``strategy.build`` of fmtrain's DeepSpeed strategy under torchrun on 2 ranks, for a
model larger than the default (~150M parameters, ~600 MB in fp32), and measures the growth of each
rank's peak resident memory during the build alone: the kernel's high-water mark (VmHWM) is reset
just before it (``/proc/self/clear_refs``). Built whole, a rank's peak holds the whole model;
partitioned, its half plus one gathered parameter. Goal: partitioned / whole <= 0.6.
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

HERE = Path(__file__).resolve().parent


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(out: str, dim: int, layers: int, zero_init: bool) -> None:
    """One rank: build the model the way the trainer does and report the peak memory it took."""
    import torch

    from fmtrain.distributed import DistEnv
    from fmtrain.models.llama import Transformer
    from fmtrain.strategies import make_strategy
    from launch.compose import compose

    cfg = compose(
        [
            f"model.dim={dim}",
            f"model.n_layers={layers}",
            "model.n_heads=16",
            "strategy=deepspeed",
            "strategy.zero_stage=3",
            f"strategy.zero_init={str(zero_init).lower()}",
            "launcher.nproc=2",
        ]
    )
    env = DistEnv.from_environ()
    device = env.init("cpu")
    strategy = make_strategy(cfg.strategy, cfg.precision.name, cfg.trainer, env, device)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    full_bytes = model.num_params() * 4
    strategy._start_deepspeed()  # type: ignore[attr-defined]  # imports and communication: not the build's
    torch.distributed.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    built = strategy.build(model, cfg.seed)
    growth = (_kib("VmHWM") - before) * 1024
    held = sum(getattr(p, "ds_tensor", p).numel() * 4 for p in built.parameters())
    results = [None] * env.world_size
    torch.distributed.all_gather_object(results, {"peak_growth_bytes": growth, "held_bytes": held})
    if env.rank == 0:
        Path(out).write_text(json.dumps({"full_model_bytes": full_bytes, "ranks": results}))
    env.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "ZERO_INIT"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.dim, args.layers, args.worker[1] == "true")
        return
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # Large blocks straight from and back to the kernel: glibc would otherwise keep freed ones resident.
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for zero_init in ("false", "true"):
            out = Path(tmp) / f"{zero_init}.json"
            command = [torchrun, "--standalone", "--nproc_per_node=2", __file__, "--dim", str(args.dim)]
            command += ["--layers", str(args.layers), "--worker", str(out), zero_init]
            subprocess.run(command, check=True, capture_output=True, env=env)
            measured[zero_init] = json.loads(out.read_text())
            peak = max(r["peak_growth_bytes"] for r in measured[zero_init]["ranks"])
            print(f"zero_init={zero_init}: peak growth {peak / 2**20:,.0f} MiB per rank")
    full = measured["true"]["full_model_bytes"]
    whole = max(r["peak_growth_bytes"] for r in measured["false"]["ranks"])
    partitioned = max(r["peak_growth_bytes"] for r in measured["true"]["ranks"])
    path = common.write(
        "zero3_init",
        {
            "processes": 2,
            "model": {"dim": args.dim, "n_layers": args.layers, "fp32_bytes": full},
            "built_whole": measured["false"]["ranks"],
            "built_partitioned": measured["true"]["ranks"],
            "ratio": partitioned / whole,
            "goal": "<= 0.6",
        },
    )
    print(f"ZeRO-3 build peak, partitioned / whole: {partitioned / whole:.2f} (model {full / 2**20:,.0f} MiB)  ->  {path}")


if __name__ == "__main__":
    main()
