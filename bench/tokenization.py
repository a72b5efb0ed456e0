"""Tokenization throughput: fmtrain's data pipeline vs ``datasets.map(batched=True, num_proc=2)``.

    python bench/tokenization.py [--mb 48] [--rounds 3]

The input is a jsonl written here from the Python standard library's source files (one record per
file, repeated up to ``--mb`` MB); the tokenizer is a byte-level BPE of 8192 tokens that
``fmtrain tokenizer train`` makes from it. Each round, alternating, measures from the jsonl to token
ids on disk:

- fmtrain: ``prepare`` (data=jsonl) into a fresh cache: read, tokenize, write the shards.
- datasets: ``load_dataset("json")`` into a fresh cache, then ``map`` with the same tokenizer
  (transformers' ``PreTrainedTokenizerFast`` over the same tokenizer.json), batched, 2 processes.

Both produce the same number of ids (checked; tests/test_sources.py checks the ids themselves).
Goal: fmtrain's MB/s >= 1.0x datasets'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import common

from fmtrain.config import DataConfig
from fmtrain.data import Tokenizer, prepare
from fmtrain.tokenizer_train import train_tokenizer


def write_corpus(path: Path, megabytes: int) -> int:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    written = 0
    with open(path, "w") as out:
        while written < megabytes << 20:
            for file in files:
                text = file.read_text(errors="replace")
                if text:
                    line = json.dumps({"text": text}) + "\n"
                    out.write(line)
                    written += len(line.encode())
                if written >= megabytes << 20:
                    break
    return path.stat().st_size


def fmtrain_ids(corpus: Path, tokenizer: Tokenizer, cache: Path) -> tuple[float, int]:
    cfg = DataConfig(name="jsonl", paths=[str(corpus)], cache_dir=str(cache), max_bytes=1 << 40, val_fraction=0.001)
    start = time.perf_counter()
    built = prepare(cfg, 8192, tokenizer)
    seconds = time.perf_counter() - start
    return seconds, int(built.meta["tokens"])


def datasets_ids(corpus: Path, tokenizer_dir: Path, cache: Path) -> tuple[float, int]:
    import datasets
    import transformers

    start = time.perf_counter()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    loaded = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")

    def encode(batch: dict) -> dict:
        return {"input_ids": [[*ids, eos] for ids in tok(batch["text"])["input_ids"]]}

    mapped = loaded.map(encode, batched=True, num_proc=2, remove_columns=["text"])
    seconds = time.perf_counter() - start
    return seconds, sum(sum(map(len, batch["input_ids"])) for batch in mapped.iter(batch_size=10000))


def one(kind: str, corpus: Path, tokenizer_dir: Path, cache: Path) -> tuple[float, int]:
    """One measurement in a process of its own: datasets' forked workers turn the parent's tokenizer
    threads off (tokenizers' fork guard), which would slow whatever ran after them in one process."""
    command = [sys.executable, __file__, "--one", kind, str(corpus), str(tokenizer_dir), str(cache)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), int(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=4, metavar=("KIND", "CORPUS", "TOKENIZER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, corpus, tokenizer_dir, cache = args.one
        if kind == "fmtrain":
            seconds, tokens = fmtrain_ids(Path(corpus), Tokenizer(Path(tokenizer_dir) / "tokenizer.json"), Path(cache))
        else:
            seconds, tokens = datasets_ids(Path(corpus), Path(tokenizer_dir), Path(cache))
        print(seconds, tokens)
        return
    result: dict = {"goal": ">= 1.0 (fmtrain MB/s / datasets MB/s)", "fmtrain_s": [], "datasets_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = write_corpus(root / "corpus.jsonl", args.mb)
        train_tokenizer(DataConfig(name="jsonl", paths=[str(root / "corpus.jsonl")], max_bytes=8 << 20), 8192, root / "tok")
        for index in range(args.rounds):
            ours, our_ids = one("fmtrain", root / "corpus.jsonl", root / "tok", root / f"fm{index}")
            theirs, their_ids = one("datasets", root / "corpus.jsonl", root / "tok", root / f"ds{index}")
            assert our_ids == their_ids, f"the two pipelines made {our_ids} and {their_ids} tokens"
            result["fmtrain_s"].append(ours)
            result["datasets_s"].append(theirs)
            shutil.rmtree(root / f"fm{index}")
            shutil.rmtree(root / f"ds{index}")
            print(f"round {index + 1}: fmtrain {ours:.2f}s, datasets.map {theirs:.2f}s ({our_ids:,} tokens)", flush=True)
    result["tokens"] = our_ids
    result["megabytes"] = size / 2**20
    result["fmtrain_mb_per_s"] = result["megabytes"] / min(result["fmtrain_s"])
    result["datasets_mb_per_s"] = result["megabytes"] / min(result["datasets_s"])
    result["ratio"] = result["fmtrain_mb_per_s"] / result["datasets_mb_per_s"]
    path = common.write("tokenization", result)
    print(f"fmtrain {result['fmtrain_mb_per_s']:.2f} MB/s, datasets.map(num_proc=2) {result['datasets_mb_per_s']:.2f} MB/s: "
          f"{result['ratio']:.2f}x  ->  {path}")  # fmt: skip


if __name__ == "__main__":
    main()
