"""Helpers shared by the benchmarks: configs, the bare reference loop, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fmtrain.config import TrainConfig
from fmtrain.hardware import cpu_name
from fmtrain.models.llama import Transformer
from launch.compose import compose

RESULTS = Path(__file__).resolve().parent / "results"


def config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The composed config, with ``precision=auto`` resolved as a run on this CPU resolves it."""
    cfg = compose([f"run_dir={run_dir}", "trainer.progress=false", "trainer.plot=false", *overrides])
    if cfg.precision.name == "auto":
        from fmtrain.hardware import resolve_precision

        cfg.precision.name = resolve_precision("cpu", cfg.strategy.name, cfg.precision.name)[0]
    return cfg


def build_model(cfg: TrainConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights(cfg.seed)
    return model


def bare_loop(cfg: TrainConfig, steps: int, warmup: int) -> float:
    """Tokens/s of the plainest loop that trains the same model, batch and dtype: no framework."""
    model = build_model(cfg)
    fused = cfg.optim.implementation == "fused"  # the kernel fmtrain uses, so only the framework differs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused)
    batch, seq = cfg.trainer.global_batch_size, cfg.data.seq_len
    data = torch.randint(0, cfg.model.vocab_size, (steps, batch, seq + 1))
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.precision.name]
    start = 0.0
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        x, y = data[step, :, :-1], data[step, :, 1:]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return (steps - warmup) * batch * seq / (time.perf_counter() - start)


def fmtrain_throughput(run_dir: Path, warmup: int) -> float:
    """Tokens/s of an fmtrain run, by wall clock between step records: all per-step work counts."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    tokens_per_step = steps[0]["tokens_per_s"] * steps[0]["step_time_s"]
    return (len(steps) - warmup) * tokens_per_step / (steps[-1]["time"] - steps[warmup - 1]["time"])


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def write(name: str, result: dict) -> Path:
    """``results/<name>.json``; with ``BENCH_TAG=<tag>`` set, ``results/<name>@<tag>.json``: another machine
    kind's numbers beside the first's (``run.py`` lists both in the summary)."""
    RESULTS.mkdir(exist_ok=True)
    tag = os.environ.get("BENCH_TAG", "")
    if tag and not tag.replace("-", "").isalnum():
        raise SystemExit(f"BENCH_TAG={tag!r}: letters, digits and '-' only")
    path = RESULTS / (f"{name}@{tag}.json" if tag else f"{name}.json")
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
