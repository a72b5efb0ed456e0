"""Text corpora tokenized once into cached memmap shards, and a sampler that resumes exactly.

    shards = prepare(cfg.data, vocab_size=256)        # cached under data.cache_dir, keyed by content
    batches = GlobalBatches(shards.train, seq_len=256, seed=1337)
    batch = batches.micro_batch(consumed=112, micro_step=0, rank=1, micro_batch=4, world_size=2)
    batch["input_ids"], batch["labels"]                     # (4, seq_len) each: labels are inputs shifted by one

The default corpus is the Python standard library's own source, present wherever Python is, so
nothing is downloaded; ``data.name`` picks another source (:mod:`fmtrain.sources`: text files,
jsonl, parquet, a ``datasets`` folder, token ids). Building streams: documents are tokenized a batch
at a time onto disk, then split into shards, so an input larger than memory is fine.

Tokens are bytes (vocab 256; a 0 byte separates documents), or, with a Hugging Face tokenizer
(``data.tokenizer``: ``auto`` takes ``model.path``'s ``tokenizer.json``), its ids with the
tokenizer's own special tokens (BOS from its post-processor) and EOS after each document.

The sampler has no hidden position: sample ``g`` of the run is window ``perm_epoch[g % n]`` with
``epoch = g // n``, and a step takes the next ``B`` samples after the ``consumed`` ones. So its whole
state is one number, kept in the checkpoint; a resumed run neither repeats nor skips a sample, and
the global batch is the same for every world size (each rank takes its own contiguous slice).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtrain.config import DataConfig, cache_root
from fmtrain.examples import EXAMPLES_FORMAT, ExampleShards, PackedShards, build_examples
from fmtrain.sources import BadRecords, DataError, Source, mix_components, source_of
from fmtrain.tokenizer import BYTES, Tokenizer, stream_encoder
from fmtrain.workpool import Progress, ordered_map

FORMAT_VERSION = 1
SPLIT_BLOCK_BYTES = 65536
ENCODE_BATCH_BYTES = 4 << 20  # text tokenized at once while building
COPY_TOKENS = 1 << 22  # token ids copied (and checked) at once from data=tokens files


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every token id."""
    if vocab_size <= 1 << 8:
        return np.uint8
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _cache_key(cfg: DataConfig, files: list[Path], vocab_size: int, tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    settings = [FORMAT_VERSION, tokenizer.identity, vocab_size, cfg.val_fraction, cfg.max_bytes, cfg.shard_tokens]
    if cfg.name not in ("stdlib", "text_files"):  # text files keep the keys they had
        settings += [cfg.name, cfg.text_field, cfg.split, cfg.dtype, cfg.on_bad_record]
    if cfg.packing != "concat":  # examples: truncated to seq_len, rendered with the chat template
        template = Path(cfg.chat_template).expanduser()
        template_key = hashlib.sha256(template.read_bytes()).hexdigest()[:16] if template.is_file() else cfg.chat_template
        settings += [cfg.packing, cfg.seq_len, cfg.train_on_prompt, cfg.overlong, template_key, tokenizer.pad, EXAMPLES_FORMAT]
    digest.update(json.dumps(settings).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _write_stream(source: Source, tokenizer: Tokenizer, out: Any, dtype: type, cfg: DataConfig, vocab_size: int) -> BadRecords:
    """Every document's ids (or a token source's ids) onto ``out``, a batch at a time; text sources stop
    after ``data.max_bytes`` bytes of text."""
    bad = BadRecords(cfg.on_bad_record)
    if source.kind == "tokens":
        for path, ids in source.token_arrays():
            for start in range(0, len(ids), COPY_TOKENS):
                chunk = np.asarray(ids[start : start + COPY_TOKENS])
                if chunk.size and (chunk.max() >= vocab_size or chunk.min() < 0):
                    at = int(np.argmax((chunk >= vocab_size) | (chunk < 0)))
                    value = int(chunk[at])
                    raise DataError(
                        path, f"id {start + at}", f"{value} is outside the vocabulary 0..{vocab_size - 1} (model.vocab_size)"
                    )
                out.write(chunk.astype(dtype).tobytes())
        return bad

    utf8 = tokenizer.file is not None

    def batches() -> Iterator[tuple[list[bytes], bool, int]]:
        batch: list[bytes] = []
        total, pending, first = 0, 0, True
        for document in source.documents(bad, utf8=utf8):
            if total >= cfg.max_bytes:
                break
            if len(document) > cfg.max_bytes - total:  # cut at data.max_bytes, on a character's boundary for a tokenizer
                document = document[: cfg.max_bytes - total]
                document = document.decode("utf-8", errors="ignore").encode("utf-8") if utf8 else document
            total += len(document) + 1
            batch.append(document)
            pending += len(document)
            if pending >= ENCODE_BATCH_BYTES:
                yield batch, first, pending
                batch, pending, first = [], 0, False
        if batch:
            yield batch, first, pending

    bound = cfg.max_bytes
    if source.name == "text_files" or source.name == "jsonl":  # their text is at most their files' bytes
        bound = min(bound, sum(path.stat().st_size for path in source.files()))
    progress = Progress(cfg.name, bound, cfg.num_workers)
    file = str(tokenizer.file) if tokenizer.file is not None else None
    for ids, size in ordered_map(stream_encoder, (file, np.dtype(dtype).name), batches(), cfg.num_workers):
        out.write(ids.tobytes())
        progress.advance(done=size, tokens=len(ids))
    progress.finish()
    return bad


def _split_blocks(n_tokens: int, val_fraction: float) -> tuple[int, set[int]]:
    """Fixed-size blocks of the stream; a hash of the block index sends a fraction to validation.

    Block-level (not file-level) so that a single-file corpus splits too, and so that validation
    text comes from all over the corpus rather than from its last files.
    """
    block = min(SPLIT_BLOCK_BYTES, max(1, n_tokens // 20))
    n_blocks = -(-n_tokens // block)
    n_val = min(n_blocks - 1, max(1, round(n_blocks * val_fraction)))
    ranked = sorted(range(n_blocks), key=lambda i: zlib.crc32(str(i).encode()))
    return block, set(ranked[:n_val])


class _ShardWriter:
    """Appends ids to ``{split}_000.bin``, ``{split}_001.bin``, ... of ``shard_tokens`` ids each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int) -> None:
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.names: list[str] = []
        self.room = 0  # ids the current shard still takes

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if not self.room:
                self.names.append(f"{self.split}_{len(self.names):03d}.bin")
                self.room = self.shard_tokens
            part, ids = ids[: self.room], ids[self.room :]
            with open(self.directory / self.names[-1], "ab") as out:
                out.write(np.ascontiguousarray(part).tobytes())
            self.room -= len(part)


def _build(cfg: DataConfig, source: Source, vocab_size: int, target: Path, tokenizer: Tokenizer) -> None:
    dtype = token_dtype(vocab_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        if cfg.packing != "concat":
            found = build_examples(cfg, source, tokenizer, staging, dtype)
            meta = {"format": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "source": cfg.name}
            meta |= {"packing": cfg.packing, "pad": tokenizer.pad, "tokenizer": tokenizer.identity, **found}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            os.rename(staging, target)
            return
        stream_file = staging / "stream.tmp"
        with open(stream_file, "wb") as out:
            bad = _write_stream(source, tokenizer, out, dtype, cfg, vocab_size)
        n_tokens = stream_file.stat().st_size // np.dtype(dtype).itemsize
        if n_tokens < 2:
            raise DataError(", ".join(map(str, cfg.paths)) or cfg.name, "", f"holds {n_tokens} tokens: nothing to train on")
        stream = np.memmap(stream_file, dtype=dtype, mode="r")
        block, val_blocks = _split_blocks(n_tokens, cfg.val_fraction)
        splits = {
            "train": _ShardWriter(staging, "train", cfg.shard_tokens),
            "val": _ShardWriter(staging, "val", cfg.shard_tokens),
        }
        for b in range(-(-n_tokens // block)):
            splits["val" if b in val_blocks else "train"].write(stream[b * block : (b + 1) * block])
        del stream
        stream_file.unlink()
        meta = {
            "format": FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab_size,
            "source": cfg.name,
            "files": len(source.files()),
            "tokenizer": tokenizer.identity,
            "tokens": n_tokens,
            "bad_records": bad.as_dict(),
            "train": splits["train"].names,
            "val": splits["val"].names,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(staging, target)  # atomic; a concurrent builder that lost the race cleans up below
    except OSError:
        if not (target / "meta.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class TokenShards:
    """Read-only memmaps of one split, windows of ``seq_len + 1`` tokens that never cross shards."""

    def __init__(self, files: list[Path], dtype: str) -> None:
        self.arrays = [np.memmap(f, dtype=dtype, mode="r") for f in files]

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def num_windows(self, seq_len: int) -> int:
        return sum((len(a) - 1) // seq_len for a in self.arrays)

    def batch(self, indices: list[int], seq_len: int) -> dict[str, torch.Tensor]:
        """Windows ``indices`` as a batch: ``input_ids`` and ``labels`` (the inputs shifted by one)."""
        rows = self.windows(indices, seq_len)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def windows(self, indices: list[int], seq_len: int) -> torch.Tensor:
        """Windows ``indices`` as an int64 tensor (len(indices), seq_len + 1)."""
        counts = np.cumsum([(len(a) - 1) // seq_len for a in self.arrays])
        rows = []
        for index in indices:
            shard = int(np.searchsorted(counts, index, side="right"))
            offset = (index - (counts[shard - 1] if shard else 0)) * seq_len
            rows.append(np.asarray(self.arrays[shard][offset : offset + seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


@dataclass
class Corpus:
    """One source's cached shards."""

    directory: Path
    meta: dict

    def files(self, split: str) -> list[Path]:
        return [self.directory / name for name in self.meta[split]]

    def split(self, name: str) -> TokenShards | ExampleShards:
        """``train`` or ``val``: windows of the token stream, or fine-tuning examples (packed or alone)."""
        if "examples" in self.meta:
            shards = PackedShards if self.meta["packing"] == "bfd" else ExampleShards
            return shards(self.directory, name, self.meta["dtype"], self.meta["pad"])
        return TokenShards(self.files(name), self.meta["dtype"])

    @cached_property
    def train(self) -> TokenShards | ExampleShards:
        return self.split("train")

    @cached_property
    def val(self) -> TokenShards | ExampleShards:
        return self.split("val")

    def sampler(self, seq_len: int, seed: int) -> GlobalBatches:
        return GlobalBatches(self.train, seq_len, seed)

    def eval_ids(self, seq_len: int, count: int) -> list[int]:
        if isinstance(self.val, ExampleShards):  # every validation example once, at most count
            total = self.val.num_windows(seq_len)
            return list(range(total))[:count] if total >= count else [i % total for i in range(count)]
        return eval_windows(self.val, seq_len, count)


@dataclass
class Mixture:
    """``data=mix``: several sources' shards read as one split each (a source's windows a contiguous
    range of the split's), sampled in proportion to ``weights``."""

    parts: list[Corpus]
    weights: list[float]

    def split(self, name: str) -> TokenShards | ConcatShards:
        if "examples" in self.parts[0].meta:  # fine-tuning examples (data.packing none or bfd), one set a source
            return ConcatShards([part.split(name) for part in self.parts])
        return TokenShards([f for part in self.parts for f in part.files(name)], self.parts[0].meta["dtype"])

    @cached_property
    def train(self) -> TokenShards | ConcatShards:
        return self.split("train")

    @cached_property
    def val(self) -> TokenShards | ConcatShards:
        return self.split("val")

    @property
    def meta(self) -> dict[str, Any]:
        metas = [part.meta for part in self.parts]
        bad = [meta.get("bad_records", {"count": 0, "first": []}) for meta in metas]
        first = [line for b in bad for line in b["first"]][:5]
        found = {"bad_records": {"count": sum(b["count"] for b in bad), "first": first}, "parts": metas}
        if "examples" in metas[0]:  # what the log reports of fine-tuning examples, over all sources
            found["examples"] = {split: sum(m["examples"][split] for m in metas) for split in ("train", "val")}
            found["overlong"] = {kind: sum(m["overlong"][kind] for m in metas) for kind in ("truncated", "dropped")}
            found["targets"] = sum(m["targets"] for m in metas)
        return found

    def _windows(self, split: str, seq_len: int) -> list[int]:
        counts = [getattr(part, split).num_windows(seq_len) for part in self.parts]
        for part, count in zip(self.parts, counts, strict=True):
            if count < 1:
                source = part.meta.get("source", "a source")
                raise ValueError(f"data=mix: {source} ({part.directory}) has no {split} window of {seq_len + 1} tokens")
        return counts

    def sampler(self, seq_len: int, seed: int) -> MixedBatches:
        return MixedBatches(self.train, seq_len, seed, self._windows("train", seq_len), self.weights)

    def eval_ids(self, seq_len: int, count: int) -> list[int]:
        """``count`` validation windows, each source's share by weight (one at least), spread over its part."""
        counts = self._windows("val", seq_len)
        ids, offset = [], 0
        for available, share in zip(counts, quotas(self.weights, count), strict=True):
            stride = max(1, available // share)
            ids += [offset + (i * stride) % available for i in range(share)]
            offset += available
        return ids


class ConcatShards:
    """Several sources' fine-tuning examples as one split (data=mix with data.packing none or bfd):
    window ``i`` is part ``k``'s window ``i - start_k``, as :class:`TokenShards` lays out token files."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    @property
    def num_tokens(self) -> int:
        return sum(part.num_tokens for part in self.parts)

    def num_windows(self, seq_len: int) -> int:
        return sum(part.num_windows(seq_len) for part in self.parts)

    def batch(self, indices: list[int], seq_len: int) -> dict[str, torch.Tensor]:
        ends = np.cumsum([part.num_windows(seq_len) for part in self.parts])
        owner = np.searchsorted(ends, indices, side="right")
        rows: dict[int, list[int]] = {}
        for row, k in enumerate(owner.tolist()):
            rows.setdefault(k, []).append(row)
        out: dict[str, torch.Tensor] = {}
        for k, where in rows.items():
            start = int(ends[k - 1]) if k else 0
            part = self.parts[k].batch([indices[row] - start for row in where], seq_len)
            for key, value in part.items():
                if key not in out:
                    out[key] = value.new_empty((len(indices), *value.shape[1:]))
                out[key][where] = value
        return out


Shards = TokenShards | ExampleShards | ConcatShards  # what a sampler draws windows (or examples, or rows) from


def quotas(weights: list[float], total: int) -> list[int]:
    """``total`` shared out in proportion to ``weights`` (largest remainders), each at least 1."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))[: total - sum(shares)]:
        shares[i] += 1
    for i, share in enumerate(shares):
        if share == 0:
            shares[i] = 1
            shares[max(range(len(shares)), key=lambda j: shares[j])] -= 1
    return shares


def cache_path(cfg: DataConfig, vocab_size: int, tokenizer: Tokenizer = BYTES) -> Path:
    files = source_of(cfg).files()
    if not files:
        raise FileNotFoundError(f"data.paths={cfg.paths!r} matches no file")
    root = Path(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else cache_root() / "data"
    return root / _cache_key(cfg, files, vocab_size, tokenizer)


def prepare(cfg: DataConfig, vocab_size: int, tokenizer: Tokenizer = BYTES) -> Corpus | Mixture:
    """Tokenize the corpus (each source of a mixture) into shards unless an identical cache exists;
    return it opened.

    Safe to call from several processes at once: each builds in a private staging folder and the
    first atomic rename wins.
    """
    if cfg.name == "mix":
        components = mix_components(cfg)
        parts = [prepare(component, vocab_size, tokenizer) for component, _ in components]
        return Mixture([p for p in parts if isinstance(p, Corpus)], [weight for _, weight in components])
    target = cache_path(cfg, vocab_size, tokenizer)
    if not (target / "meta.json").exists():
        _build(cfg, source_of(cfg), vocab_size, target, tokenizer)
    return Corpus(target, json.loads((target / "meta.json").read_text()))


class GlobalBatches:
    """Deterministic global batches over a split: a fresh seeded permutation every epoch."""

    def __init__(self, shards: Shards, seq_len: int, seed: int) -> None:
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.num_windows = shards.num_windows(seq_len)
        if self.num_windows < 1:
            raise ValueError(f"the training split holds {shards.num_tokens} tokens, fewer than one window of {seq_len + 1}")
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _window_of(self, sample: int) -> int:
        epoch, position = divmod(sample, self.num_windows)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_windows, generator=generator)
        return int(self._perm[position])

    def micro_batch(
        self, consumed: int, micro_step: int, rank: int, micro_batch: int, world_size: int
    ) -> dict[str, torch.Tensor]:
        """The batch (``input_ids`` and ``labels``, (micro_batch, seq_len) each) that ``rank`` trains on
        at this micro-step, ``consumed`` samples into the run."""
        first = consumed + (micro_step * world_size + rank) * micro_batch
        return self.shards.batch([self._window_of(first + i) for i in range(micro_batch)], self.seq_len)


class MixedBatches(GlobalBatches):
    """Global batches over a mixture: sample ``g`` falls in block ``g // BLOCK``, whose slots are shared
    out by weight (:func:`quotas`) and shuffled by the seed; the ``k``-th sample of a source is its
    window ``perm_epoch[k % n]``, as :class:`GlobalBatches`. A pure function of ``g``: the state is
    still the one number ``consumed``."""

    BLOCK = 1024

    def __init__(self, shards: Shards, seq_len: int, seed: int, counts: list[int], weights: list[float]) -> None:
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.num_windows = sum(counts)
        self.counts, self.offsets = counts, np.cumsum([0, *counts[:-1]]).tolist()
        self.quota = quotas(weights, self.BLOCK)
        self._block_index, self._slots, self._before = -1, np.empty(0, np.int64), np.empty((0, 0), np.int64)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}

    def _block(self, block: int) -> None:
        if block != self._block_index:
            slots = np.repeat(np.arange(len(self.quota)), self.quota)
            order = torch.randperm(self.BLOCK, generator=torch.Generator().manual_seed(self.seed + 7919 * (block + 1)))
            self._slots = slots[order.numpy()]
            onehot = np.eye(len(self.quota), dtype=np.int64)[self._slots]
            self._before = np.cumsum(onehot, axis=0) - onehot  # each source's slots before each position
            self._block_index = block

    def _window_of(self, sample: int) -> int:
        block, position = divmod(sample, self.BLOCK)
        self._block(block)
        source = int(self._slots[position])
        k = block * self.quota[source] + int(self._before[position, source])
        epoch, index = divmod(k, self.counts[source])
        if self._perms.get(source, (-1,))[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch + 1_000_003 * (source + 1))
            self._perms[source] = (epoch, torch.randperm(self.counts[source], generator=generator))
        return self.offsets[source] + int(self._perms[source][1][index])


def eval_windows(shards: TokenShards, seq_len: int, count: int) -> list[int]:
    """``count`` validation windows spread evenly over the split (repeating if it is short)."""
    total = shards.num_windows(seq_len)
    if total < 1:
        raise ValueError(f"the validation split holds {shards.num_tokens} tokens, fewer than one window of {seq_len + 1}")
    stride = max(1, total // count)
    return [(i * stride) % total for i in range(count)]
