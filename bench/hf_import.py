"""Importing and fine-tuning a Hugging Face model: fmtrain vs transformers, in the same run.

    python bench/hf_import.py        # writes results/hf_import.json

1. Peak resident memory per rank while a 1.06 GB and a 2.2 GB Llama (transformers' own, saved with
   ``save_pretrained``) are imported under ``strategy=fsdp`` on 2 ranks (fmtrain logs each rank's peak
   from the start of loading to its end), vs ``AutoModelForCausalLM.from_pretrained`` of the same
   directory in one process, then one forward pass (from_pretrained maps the file and reads each
   weight at its first use; its peak before that is reported too). Both include the Python and torch
   runtime: a rank's runtime (torch, torch.distributed, ~300 MB) is beside its half of the model, so
   the ratio falls as the model grows. Goal <= 0.6.
2. Fine-tuning tokens/s of ``model=hf`` (fmtrain's decoder, one process) vs transformers' own model in
   a plain training loop (fused AdamW, the same batch, sequence, fp32, gradient clipping), rounds
   alternating, each eager and compiled: best against best. Goal >= 1.15.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
import transformers

import fmtrain

FMTRAIN = str(Path(sys.executable).parent / "fmtrain")
PEAK = re.compile(r"peak resident memory while loading: (\d+) MB")
BASELINE = """
import sys, transformers, torch
def peak():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) // 1024
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
loaded = peak()
with torch.no_grad():
    model(input_ids=torch.zeros(1, 8, dtype=torch.long))
print(loaded, peak())
"""


def save(config: transformers.LlamaConfig, directory: Path) -> None:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def import_memory(tmp: Path, layers: int) -> dict:
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16
    )
    config.max_position_embeddings = 256
    big = tmp / f"big{layers}"
    save(config, big)  # 16 layers: 264M parameters, 1.06 GB in fp32; 40 layers: 2.2 GB
    # from_pretrained maps the file and reads a weight when it is first used: its peak right after
    # loading leaves the weights out; after one forward pass they are all in memory, as for training.
    out = subprocess.run([sys.executable, "-c", BASELINE, str(big)], capture_output=True, text=True, check=True)
    lazy, theirs = map(int, out.stdout.split()[-2:])
    shutil.rmtree(big.parent / "import", ignore_errors=True)
    run_dir = big.parent / "import"
    args = [f"run_dir={run_dir}", "model=hf", f"model.path={big}", "strategy=fsdp", "launcher.nproc=2"]
    args += [
        "data.seq_len=64",
        "trainer.global_batch_size=2",
        "trainer.max_steps=1",
        "trainer.eval_batches=1",
        "trainer.plot=false",
    ]
    subprocess.run([FMTRAIN, "train", *args], capture_output=True, text=True, check=True)
    ours = [int(PEAK.search((run_dir / "logs" / f"rank{r}.log").read_text()).group(1)) for r in range(2)]  # type: ignore[union-attr]
    size = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**20
    shutil.rmtree(big)
    return {
        "model_mb": round(size),
        "from_pretrained_peak_mb": theirs,
        "from_pretrained_peak_before_first_use_mb": lazy,
        "fmtrain_fsdp_rank_peak_mb": ours,
        "ratio": max(ours) / theirs,
        "goal": "<= 0.6",
    }


def hf_loop(directory: Path, batch: int, seq: int, steps: int, warmup: int, compiled: bool = False) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.train()
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    data = torch.randint(0, model.config.vocab_size, (steps, batch, seq + 1))
    start = 0.0
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        logits = model(input_ids=data[step, :, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[step, :, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return (steps - warmup) * batch * seq / (time.perf_counter() - start)


def fine_tune_throughput(tmp: Path, rounds: int = 3, steps: int = 30, warmup: int = 8) -> dict:
    """Each side eager and compiled (transformers: the whole model; fmtrain: ``trainer.compile``,
    its blocks), fused AdamW on both; the ratio is best against best (each side's median)."""
    # fmtrain's default model's shape, as a transformers Llama
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4
    )
    config.max_position_embeddings = 1024
    save(config, tmp / "tiny")
    batch, seq = 16, 256
    theirs: dict[str, list[float]] = {"eager": [], "compiled": []}
    ours: dict[str, list[float]] = {"eager": [], "compiled": []}
    for index in range(rounds):
        for mode in ("eager", "compiled"):
            theirs[mode].append(hf_loop(tmp / "tiny", batch, seq, steps, warmup, compiled=mode == "compiled"))
            overrides = ["model=hf", f"model.path={tmp / 'tiny'}", f"trainer.max_steps={steps}", f"trainer.eval_interval={steps}"]
            overrides += ["precision=fp32"]  # transformers' loop trains in fp32
            overrides += [f"checkpoint.interval={steps}", f"trainer.global_batch_size={batch}", f"data.seq_len={seq}"]
            overrides += [f"trainer.compile={mode == 'compiled'}"]
            cfg = common.config(tmp / f"ft{index}{mode}", overrides)
            fmtrain.run(cfg)
            ours[mode].append(common.fmtrain_throughput(Path(cfg.run_dir), warmup))
            print(
                f"round {index} {mode}: transformers {theirs[mode][-1]:,.0f} tok/s, fmtrain model=hf {ours[mode][-1]:,.0f} tok/s"
            )
    best_theirs = max(common.median(v) for v in theirs.values())
    best_ours = max(common.median(v) for v in ours.values())
    return {
        "transformers_tokens_per_s": theirs,
        "fmtrain_tokens_per_s": ours,
        "eager_ratio": common.median(ours["eager"]) / common.median(theirs["eager"]),
        "ratio": best_ours / best_theirs,
        "goal": ">= 1.15",
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fmtrain-bench-") as tmp:
        memory = [import_memory(Path(tmp), layers) for layers in (16, 40)]
        for size in memory:
            print(
                f"import peak per rank, {size['model_mb']} MB model: fmtrain fsdp {size['fmtrain_fsdp_rank_peak_mb']} MB, "
                f"from_pretrained {size['from_pretrained_peak_mb']} MB: {size['ratio']:.2f} (goal <= 0.6)"
            )
        speed = fine_tune_throughput(Path(tmp))
        print(f"fine-tuning: {speed['ratio']:.2f}x transformers' loop (goal >= 1.15)")
    path = common.write("hf_import", {"import_memory": memory, "fine_tune": speed})
    print(path)


if __name__ == "__main__":
    main()
