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

Beside them, ``data.num_workers=2`` against 1 on the same jsonl, and on chat records (the same text
cut into user/assistant turns, rendered with chatml, the answers masked), where the template's
Python work is what worker processes share out; each in its own process, alternating.
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
from fmtrain.data import prepare
from fmtrain.tokenizer import Tokenizer
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


def write_chats(corpus: Path, path: Path) -> int:
    """The corpus's texts as conversations: each text's lines shared out into alternating turns."""
    with open(corpus) as lines, open(path, "w") as out:
        for line in lines:
            text = json.loads(line)["text"].splitlines(keepends=True)
            turns = ["".join(text[i : i + 8]) for i in range(0, len(text), 8)]
            messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns[: len(turns) // 2 * 2])]
            if messages:
                out.write(json.dumps({"messages": messages}) + "\n")
    return path.stat().st_size


def fmtrain_ids(corpus: Path, tokenizer: Tokenizer, cache: Path, workers: int = 1, chat: bool = False) -> tuple[float, int]:
    cfg = DataConfig(
        name="jsonl", paths=[str(corpus)], cache_dir=str(cache), max_bytes=1 << 40, val_fraction=0.001, num_workers=workers
    )
    if chat:  # one example a conversation, truncated to 4096 tokens
        cfg = DataConfig(**{**cfg.__dict__, "packing": "none", "seq_len": 4095, "val_fraction": 0.05})
    start = time.perf_counter()
    built = prepare(cfg, 8192, tokenizer)
    seconds = time.perf_counter() - start
    tokens = built.train.num_tokens + built.val.num_tokens if chat else built.meta["tokens"]
    return seconds, int(tokens)


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
        if kind != "datasets":  # fmtrain_w1, fmtrain_w2, chat_w1, chat_w2
            tokenizer = Tokenizer(Path(tokenizer_dir) / "tokenizer.json")
            workers, chat = int(kind[-1]), kind.startswith("chat")
            seconds, tokens = fmtrain_ids(Path(corpus), tokenizer, Path(cache), workers, chat)
        else:
            seconds, tokens = datasets_ids(Path(corpus), Path(tokenizer_dir), Path(cache))
        print(seconds, tokens)
        return
    result: dict = {"goal": ">= 1.0 (fmtrain MB/s / datasets MB/s)"}
    kinds = ["fmtrain_w1", "datasets", "fmtrain_w2", "chat_w1", "chat_w2"]
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    ids: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = write_corpus(root / "corpus.jsonl", args.mb)
        chat_size = write_chats(root / "corpus.jsonl", root / "chats.jsonl")
        train_tokenizer(DataConfig(name="jsonl", paths=[str(root / "corpus.jsonl")], max_bytes=8 << 20), 8192, root / "tok")
        for index in range(args.rounds):
            for kind in kinds:
                corpus = root / ("chats.jsonl" if kind.startswith("chat") else "corpus.jsonl")
                took, ids[kind] = one(kind, corpus, root / "tok", root / f"{kind}{index}")
                seconds[kind].append(took)
                shutil.rmtree(root / f"{kind}{index}")
            assert ids["fmtrain_w1"] == ids["datasets"] == ids["fmtrain_w2"], (
                f"the pipelines made different numbers of ids: {ids}"
            )
            assert ids["chat_w1"] == ids["chat_w2"], ids
            print(f"round {index + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()), flush=True)
    best = {kind: min(values) for kind, values in seconds.items()}
    result |= {f"{kind}_s": values for kind, values in seconds.items()}
    result["tokens"], result["megabytes"], result["chat_megabytes"] = ids["fmtrain_w1"], size / 2**20, chat_size / 2**20
    result["fmtrain_mb_per_s"] = result["megabytes"] / best["fmtrain_w1"]
    result["datasets_mb_per_s"] = result["megabytes"] / best["datasets"]
    result["ratio"] = result["fmtrain_mb_per_s"] / result["datasets_mb_per_s"]
    result["workers2_mb_per_s"] = result["megabytes"] / best["fmtrain_w2"]
    result["workers2_ratio"] = best["fmtrain_w1"] / best["fmtrain_w2"]
    result["chat_mb_per_s"] = {"1": result["chat_megabytes"] / best["chat_w1"], "2": result["chat_megabytes"] / best["chat_w2"]}
    result["chat_workers2_ratio"] = best["chat_w1"] / best["chat_w2"]
    path = common.write("tokenization", result)
    print(f"fmtrain {result['fmtrain_mb_per_s']:.2f} MB/s, datasets.map(num_proc=2) {result['datasets_mb_per_s']:.2f} MB/s: "
          f"{result['ratio']:.2f}x; data.num_workers=2: {result['workers2_ratio']:.2f}x text, "
          f"{result['chat_workers2_ratio']:.2f}x chats  ->  {path}")  # fmt: skip


if __name__ == "__main__":
    main()
