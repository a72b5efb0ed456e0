"""`fmtrain train` (the default run) vs nanoGPT's `train.py` at the same shape, on the same tokens.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python bench/nanogpt.py --nanogpt /tmp/nanoGPT [--iters 40] [--rounds 2]

The shape is fmtrain's default: 4 layers x 256 dims x 4 heads, sequence 256, batch 16, the bytes of
the Python standard library (fmtrain's tokenized cache, written as nanoGPT's uint16 ``train.bin`` /
``val.bin`` with ``meta.pkl`` vocab 256). nanoGPT runs at its own CPU settings (``device=cpu``: no
autocast on a CPU, so fp32; its non-fused AdamW), with ``compile`` off and on; fmtrain runs its
default (``precision=auto``) and with ``precision=fp32`` named. Tokens/s come from each tool's wall
clock per step after a warm-up (nanoGPT's ``iter N: ... time Tms`` lines; fmtrain's step records),
so each one's own data loading and logging count. Rounds alternate. nanoGPT's code is not part of
fmtrain: this copies ``train.py``, ``model.py`` and ``configurator.py`` from your clone into a
temporary folder and runs them there. Goal: the default run >= 1.2x nanoGPT's best.
"""

from __future__ import annotations

import argparse
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

from fmtrain.data import prepare
from fmtrain.tokenizer import tokenizer_of

FMTRAIN = str(Path(sys.executable).parent / "fmtrain")
ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)


def write_dataset(folder: Path) -> dict:
    """fmtrain's default corpus as nanoGPT's data/<name>/{train,val}.bin and meta.pkl."""
    cfg = common.config(folder / "prep", [])
    corpus = prepare(cfg.data, cfg.model.vocab_size, tokenizer_of(cfg))
    data = folder / "data" / "fmtrain"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(a) for a in getattr(corpus, split).arrays]).astype(np.uint16)
        tokens.tofile(data / f"{split}.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": cfg.model.vocab_size}))
    m = cfg.model
    return {
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_embd": m.dim,
        "block_size": cfg.data.seq_len,
        "batch_size": cfg.trainer.global_batch_size,
        "learning_rate": cfg.optim.lr,
    }


def nanogpt_tokens_per_s(folder: Path, shape: dict, iters: int, warmup: int, compile_: bool) -> float:
    settings = {
        **shape,
        "dataset": "'fmtrain'",
        "device": "'cpu'",
        "dtype": "'float32'",
        "compile": compile_,
        "gradient_accumulation_steps": 1,
        "max_iters": iters,
        "lr_decay_iters": iters,
        "warmup_iters": 0,
        "eval_interval": 10 * iters,  # one evaluation, before the first step (as fmtrain evaluates at its last)
        "eval_iters": 2,
        "log_interval": 1,
        "dropout": 0.0,
        "bias": False,
        "always_save_checkpoint": False,
        "out_dir": "'out'",
    }
    command = [sys.executable, "train.py", *(f"--{key}={value}" for key, value in settings.items())]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    seconds = [float(ms) / 1e3 for step, ms in ITER.findall(result.stdout) if int(step) > warmup]
    return shape["batch_size"] * shape["block_size"] * len(seconds) / sum(seconds)


def fmtrain_tokens_per_s(folder: Path, name: str, iters: int, warmup: int, overrides: list[str]) -> float:
    run_dir = folder / name
    steps = [f"trainer.max_steps={iters}", f"trainer.eval_interval={iters}", f"checkpoint.interval={iters}"]
    command = [FMTRAIN, "train", f"run_dir={run_dir}", "trainer.plot=false", "trainer.progress=false", *steps, *overrides]
    subprocess.run(command, capture_output=True, text=True, check=True)
    return common.fmtrain_throughput(run_dir, warmup=warmup)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nanogpt", type=Path, required=True, help="a clone of github.com/karpathy/nanoGPT")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs = {
        "fmtrain default": [],
        "fmtrain precision=fp32": ["precision=fp32"],
        "nanoGPT compile=False": False,
        "nanoGPT compile=True": True,
    }
    measured: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for file in ("train.py", "model.py", "configurator.py"):
            shutil.copy(args.nanogpt / file, folder / file)
        shape = write_dataset(folder)
        for round_ in range(args.rounds):
            for name, how in runs.items():
                if isinstance(how, bool):
                    value = nanogpt_tokens_per_s(folder, shape, args.iters, args.warmup, how)
                else:
                    run = f"{name.replace(' ', '_').replace('=', '-')}{round_}"  # no '=' in a run_dir override
                    value = fmtrain_tokens_per_s(folder, run, args.iters, args.warmup, how)
                measured[name].append(value)
                print(f"round {round_}: {name} {value:,.0f} tok/s", flush=True)
    best = {name: max(values) for name, values in measured.items()}
    nanogpt_best = max(best["nanoGPT compile=False"], best["nanoGPT compile=True"])
    path = common.write(
        "nanogpt",
        {
            "shape": shape,
            "tokens_per_s": measured,
            "best_tokens_per_s": best,
            "ratio": best["fmtrain default"] / nanogpt_best,
            "ratio_fp32": best["fmtrain precision=fp32"] / nanogpt_best,
            "goal": ">= 1.2",
        },
    )
    print(f"fmtrain default / nanoGPT best: {best['fmtrain default'] / nanogpt_best:.2f}  ->  {path}")


if __name__ == "__main__":
    main()
