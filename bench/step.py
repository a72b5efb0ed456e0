"""One training step at the same shape: fmtrain's decoder vs transformers' LlamaForCausalLM (and
nanoGPT's GPT, from a clone you point at), and where each step's time goes, by operator.

    python bench/step.py [--nanogpt DIR] [--label after] [--rounds 5] [--compile]

A step is what each tool's own loop does: forward (under bf16 autocast, or fp32), the next-token
cross-entropy in fp32, backward, gradient clipping, fused AdamW, zero_grad. The models are built at
identical sizes (transformers' Llama from its own ``LlamaConfig``, SDPA attention; nanoGPT's GPT
with its GELU MLP, LayerNorm, learned positions and tied head: the nearest it has, ~2% fewer
FLOPs). Rounds alternate the models in one process; each model's best round counts.

The profile groups each model's self time per operator: matmuls, attention, elementwise math, copies
and casts (dtype conversions, cat/stack, contiguous), the loss, the optimizer. ``--compile`` writes
``results/step_compiled.json`` (each model eager and compiled, in one sitting). ``--label before``
writes ``results/step_before.json`` (run it at an older commit with this script) so the summary
shows the profile before and after. nanoGPT's code is not part of fmtrain: clone it yourself
(``git clone https://github.com/karpathy/nanoGPT``) and pass ``--nanogpt``. Goal: fmtrain's step
>= 1.15x transformers' at the same dtype.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from torch import nn

from fmtrain.hardware import probe
from fmtrain.models.llama import LlamaSpec

SHAPES = {"tiny (default)": [], "small": ["model=small", "data.seq_len=512", "trainer.global_batch_size=8"]}
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),
    "optimizer": ("_fused_adamw", "_foreach", "adamw", "Optimizer"),
    "copies and casts": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::cat", "aten::stack", "aten::flip", "aten::clone"),
    "elementwise": (
        "aten::mul",
        "aten::add",
        "aten::sub",
        "aten::div",
        "aten::neg",
        "aten::silu",
        "aten::gelu",
        "aten::pow",
        "aten::rsqrt",
        "aten::mean",
        "aten::sum",
        "aten::tanh",
        "aten::fill_",
        "aten::zero_",
        "norm",
        "aten::embedding",
        "aten::where",
    ),
}
Step = Callable[[], None]


class Logits(nn.Module):
    """transformers' model as ids -> logits, no cache: what the other two compute."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def transformers_llama(cfg) -> nn.Module:
    """transformers' Llama at fmtrain's sizes: the config.json fmtrain's own export writes for them."""
    import transformers

    config = transformers.LlamaConfig(**LlamaSpec().adapter(cfg.model).external_config(), attn_implementation="sdpa")
    return Logits(transformers.LlamaForCausalLM(config))


def nanogpt(cfg, directory: Path) -> nn.Module:
    spec = importlib.util.spec_from_file_location("nanogpt_model", directory / "model.py")
    assert spec and spec.loader, f"no model.py in {directory}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    m = cfg.model
    sizes = {"n_layer": m.n_layers, "n_head": m.n_heads, "n_embd": m.dim}
    config = module.GPTConfig(block_size=cfg.data.seq_len, vocab_size=m.vocab_size, dropout=0.0, bias=False, **sizes)
    return module.GPT(config)


def stepper(model: nn.Module, data: torch.Tensor, dtype: torch.dtype | None, *, nanogpt_style: bool = False) -> Step:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # as each loop's batches are

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if nanogpt_style:  # its forward computes the loss itself (logits of the last position only without targets)
                _, loss = model(x, y)
            else:
                logits = model(x)
        if not nanogpt_style:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def build_steps(cfg, dtype: torch.dtype | None, nanogpt_dir: Path | None, compiled: bool) -> dict[str, Step]:
    torch.manual_seed(0)
    data = torch.randint(0, cfg.model.vocab_size, (cfg.trainer.global_batch_size, cfg.data.seq_len + 1))
    ours = common.build_model(cfg)
    models: dict[str, tuple[nn.Module, bool]] = {"fmtrain": (ours, False), "transformers": (transformers_llama(cfg), False)}
    if nanogpt_dir is not None:
        models["nanoGPT"] = (nanogpt(cfg, nanogpt_dir), True)
    steps = {}
    for name, (model, own_loss) in models.items():
        if compiled:
            if name == "fmtrain":  # trainer.compile: each block
                for block in model.blocks:
                    block.compile()
            else:
                model = torch.compile(model)
        steps[name] = stepper(model, data, dtype, nanogpt_style=own_loss)
    return steps


def time_rounds(steps: dict[str, Step], rounds: int, per_round: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each round, rounds alternating; and each model's first two steps (compile)."""
    first = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        step()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            times[name].append((time.perf_counter() - start) / per_round)
    return dict(times), first


def profile(step: Step, steps: int = 3) -> dict:
    """Self time per operator over ``steps`` steps, grouped, in ms per step, and the top operators."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    groups: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        if not event.key.startswith("aten::") and not any(k in event.key for k in GROUPS["optimizer"]):
            continue  # autograd and profiler wrappers: their self time is bookkeeping, their children are counted
        group = next((g for g, keys in GROUPS.items() if any(k in event.key for k in keys)), "other")
        ms = event.self_cpu_time_total / 1e3 / steps
        groups[group] += ms
        ops.append((event.key, ms))
    total = sum(groups.values())
    return {
        "ms_per_step": total,
        "groups_ms": {g: round(v, 2) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": [[k, round(v, 2)] for k, v in sorted(ops, key=lambda kv: -kv[1])[:12]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nanogpt", type=Path, help="a clone of github.com/karpathy/nanoGPT (its model.py is used)")
    parser.add_argument("--label", default="after", choices=("after", "before"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also each model compiled (slow to start on CPU)")
    args = parser.parse_args()
    dtypes = {"fp32": None, **({"bf16": torch.bfloat16} if probe("cpu", engines=False).native_bf16 else {})}
    result: dict = {"shapes": {}, "goal": ">= 1.15 vs transformers at the same dtype"}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, overrides in SHAPES.items():
            cfg = common.config(Path(tmp) / shape.split()[0], [*overrides, "precision=fp32"])
            for label, dtype in dtypes.items():
                for compiled in (False, True) if args.compile else (False,):
                    key = f"{shape} {label}{' compiled' if compiled else ''}"
                    steps = build_steps(cfg, dtype, args.nanogpt, compiled)
                    times, first = time_rounds(steps, args.rounds, args.per_round)
                    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
                    row = {
                        "tokens_per_s": {name: [tokens / t for t in ts] for name, ts in times.items()},
                        "best_tokens_per_s": {name: tokens / min(ts) for name, ts in times.items()},
                        "first_two_steps_s": first,
                    }
                    best = row["best_tokens_per_s"]
                    row["vs_transformers"] = best["fmtrain"] / best["transformers"]
                    if "nanoGPT" in best:
                        row["vs_nanogpt"] = best["fmtrain"] / best["nanoGPT"]
                    if not compiled:
                        row["profile"] = {name: profile(step) for name, step in steps.items()}
                    result["shapes"][key] = row
                    summary = ", ".join(f"{name} {value:,.0f}" for name, value in best.items())
                    print(f"{key}: tok/s {summary}; fmtrain/transformers {row['vs_transformers']:.2f}", flush=True)
    result["nanogpt"] = str(args.nanogpt) if args.nanogpt else "not measured: pass --nanogpt DIR"
    # --compile: its own file, eager rows included (the same sitting's baseline), so the profile
    # before/after in step.json and step_before.json stays one machine's and one sitting's
    name = "step" if args.label == "after" else "step_before"
    path = common.write(f"{name}_compiled" if args.compile else name, result)
    print(f"-> {path}")


if __name__ == "__main__":
    sys.exit(main())
