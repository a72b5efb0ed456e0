"""Fine-tuning data: throughput of packed examples vs pretraining windows, and how full the rows are.

    python bench/packing.py [--steps 40] [--rounds 2]

The data is written here: 6,000 prompt/completion records whose lengths follow a skewed (Pareto)
distribution, mostly short, a few near ``data.seq_len`` (256 bytes: the byte tokenizer), and the
same text as plain documents. Three ``fmtrain train`` runs of the default model, alternating:

- windows: the documents as pretraining windows (data.packing=concat), the baseline;
- bfd: the records packed best-fit-decreasing (block-diagonal attention, positions restarting);
- none: each record alone in a row, padded.

Rows per second of the same shape compare the data path and the attention mask's cost (goal: bfd
>= 0.95x windows); the share of real tokens per row (from the run's log) compares bfd's packing
with padding. Answer tokens per second, what fine-tuning is paid for, are reported for both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

BIN = Path(sys.executable).parent
SEQ = 256


def write_data(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    words = "the of and to in is that it for as with was on be by this are from or have an not which".split()  # noqa: SIM905
    records, documents = [], []
    for _ in range(6000):
        length = int(min(SEQ, 16 + rng.pareto(1.2) * 24))  # bytes: mostly short, a heavy tail
        text = " ".join(rng.choice(words, size=length // 3)).strip()[: length - 8]
        cut = max(1, len(text) // 3)
        records.append({"prompt": text[:cut], "completion": text[cut:] or "x"})
        documents.append({"text": text})
    examples, plain = folder / "examples.jsonl", folder / "documents.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain.write_text("".join(json.dumps(d) + "\n" for d in documents * 3))
    return examples, plain


def run(name: str, data: list[str], folder: Path, steps: int) -> dict:
    run_dir = folder / name
    command = [str(BIN / "fmtrain"), "train", f"run_dir={run_dir}", f"data.seq_len={SEQ}", f"trainer.max_steps={steps}"]
    command += ["trainer.eval_interval=100000", "checkpoint.interval=100000", "trainer.progress=false", *data]
    env = dict(os.environ, FMTRAIN_CACHE=str(folder / "cache"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows_per_s = [r["tokens_per_s"] / SEQ for r in records if "tokens_per_s" in r][5:]  # after warm-up
    found = {"rows_per_s": statistics.median(rows_per_s)}
    shown = re.search(
        r"data\.packing=\w+: (\d+) rows of \d+, ([\d.]+)% real tokens \(padding each alone: ([\d.]+)%\)",
        result.stdout + result.stderr,
    )
    if shown:
        found |= {
            "rows": int(shown.group(1)),
            "real_share": float(shown.group(2)) / 100,
            "alone_share": float(shown.group(3)) / 100,
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    result: dict = {"goal": "bfd rows/s >= 0.95x windows", "seq_len": SEQ, "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        examples, plain = write_data(folder)
        runs = {
            "windows": ["data=jsonl", f"data.paths=[{plain}]"],
            "bfd": ["data=jsonl", f"data.paths=[{examples}]", "data.packing=bfd"],
            "none": ["data=jsonl", f"data.paths=[{examples}]", "data.packing=none"],
        }
        for index in range(args.rounds):
            measured = {name: run(f"{name}{index}", data, folder, args.steps) for name, data in runs.items()}
            result["rounds"].append(measured)
            print(", ".join(f"{name} {m['rows_per_s']:.1f} rows/s" for name, m in measured.items()), flush=True)
    best = {name: max(r[name]["rows_per_s"] for r in result["rounds"]) for name in ("windows", "bfd", "none")}
    last = result["rounds"][-1]
    result["best_rows_per_s"] = best
    result["ratio"] = best["bfd"] / best["windows"]
    result["bfd_real_share"] = last["bfd"]["real_share"]
    result["none_real_share"] = last["none"]["real_share"]
    result["real_tokens_per_s"] = {name: best[name] * (SEQ + 1) * last[name]["real_share"] for name in ("bfd", "none")}
    path = common.write("packing", result)
    print(
        f"bfd/windows rows/s {result['ratio']:.2f}; real tokens per row: bfd {result['bfd_real_share']:.1%}, "
        f"padding {result['none_real_share']:.1%}  ->  {path}"
    )


if __name__ == "__main__":
    main()
