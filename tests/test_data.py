"""Data: cached shards, the train/val split, and a sampler that resumes without repeats or gaps."""

from __future__ import annotations

import numpy as np
import pytest

from fmtrain.config import DataConfig
from fmtrain.data import GlobalBatches, prepare, token_dtype


@pytest.fixture()
def corpus(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):
        (text / f"doc{i}.txt").write_bytes(np.random.default_rng(i).integers(32, 127, 95 * (200 + i), dtype=np.uint8).tobytes())
    cfg = DataConfig(
        name="text_files", paths=[str(text / "*.txt")], seq_len=16, cache_dir=str(tmp_path / "cache"), shard_tokens=10_000
    )
    return cfg, prepare(cfg, vocab_size=256)


def test_shards_hold_every_byte_once_and_split_train_from_validation(corpus) -> None:
    cfg, data = corpus
    total = sum(95 * (200 + i) for i in range(3)) + 2  # two document separators
    assert data.train.num_tokens + data.val.num_tokens == total
    assert 0 < data.val.num_tokens < 0.2 * total
    assert len(data.meta["train"]) == -(-data.train.num_tokens // 10_000)  # sharded
    assert data.train.arrays[0].dtype == np.uint8
    again = prepare(cfg, vocab_size=256)
    assert again.directory == data.directory  # the cache is reused, not rebuilt


def test_token_dtype_follows_the_vocabulary() -> None:
    assert (token_dtype(256), token_dtype(257), token_dtype(65536), token_dtype(128256)) == (
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint32,
    )


def test_global_batches_are_the_same_for_every_world_size(corpus) -> None:
    _, data = corpus
    batches = GlobalBatches(data.train, seq_len=16, seed=1)
    one = batches.micro_batch(consumed=24, micro_step=0, rank=0, micro_batch=8, world_size=1)["input_ids"]
    halves = [batches.micro_batch(consumed=24, micro_step=0, rank=r, micro_batch=4, world_size=2)["input_ids"] for r in (0, 1)]
    accumulated = [
        batches.micro_batch(consumed=24, micro_step=m, rank=0, micro_batch=2, world_size=2)["input_ids"] for m in range(2)
    ]
    assert np.array_equal(one.numpy(), np.concatenate([h.numpy() for h in halves]))
    assert np.array_equal(one[[0, 1, 4, 5]].numpy(), np.concatenate([a.numpy() for a in accumulated]))


def test_a_resumed_sampler_neither_repeats_nor_skips(corpus) -> None:
    _, data = corpus
    n = GlobalBatches(data.train, seq_len=16, seed=1).num_windows
    seen = []
    for consumed in range(0, 2 * n, 8):  # two epochs, a fresh sampler each step as after a resume
        batch = GlobalBatches(data.train, seq_len=16, seed=1).micro_batch(consumed, 0, 0, 8, 1)
        inputs, targets = batch["input_ids"], batch["labels"]
        assert np.array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())
        seen += [tuple(row.tolist()) for row in inputs]
    first, second = seen[:n], seen[n : 2 * n]
    windows = sorted(tuple(r.tolist()) for r in data.train.windows(list(range(n)), 16)[:, :-1])
    assert len(set(windows)) == n
    assert sorted(first) == windows and sorted(second) == windows  # every window once per epoch
    assert first != second  # reshuffled each epoch
