"""Text corpora tokenized once into cached memmap shards, and a sampler that resumes exactly.

    shards = prepare(cfg.data, vocab_size=256)        # cached under data.cache_dir, keyed by content
    batches = GlobalBatches(shards.train, seq_len=256, seed=1337)
    batch = batches.micro_batch(consumed=112, micro_step=0, rank=1, micro_batch=4, world_size=2)
    batch["input_ids"], batch["labels"]                     # (4, seq_len) each: labels are inputs shifted by one

The default corpus is the Python standard library's own source, present wherever Python is, so
nothing is downloaded. Tokens are bytes (vocab 256; a 0 byte separates documents), or, with a
Hugging Face tokenizer (``data.tokenizer``: ``auto`` takes ``model.path``'s ``tokenizer.json``), its
ids with the tokenizer's own special tokens (BOS from its post-processor) and EOS after each document.

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
import sysconfig
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtrain.config import ConfigError, DataConfig, TrainConfig, cache_root, resolve_data_paths

EOS = 0
FORMAT_VERSION = 1
SPLIT_BLOCK_BYTES = 65536


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every token id."""
    if vocab_size <= 1 << 8:
        return np.uint8
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def corpus_files(cfg: DataConfig) -> list[Path]:
    if cfg.paths:
        return resolve_data_paths(cfg.paths)
    files = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(root, n) for n in names if n.endswith(".py")]
    return sorted(files)


def encode_bytes(text: bytes) -> np.ndarray:
    """The byte tokenizer: every byte is its own token."""
    return np.frombuffer(text, dtype=np.uint8)


@dataclass(frozen=True)
class Tokenizer:
    """How text becomes token ids: fmtrain's bytes, a Hugging Face ``tokenizer.json`` (the
    ``tokenizers`` library) or a SentencePiece ``tokenizer.model`` (the ``sentencepiece`` library)."""

    file: Path | None = None  # None: the byte tokenizer

    @property
    def sentencepiece(self) -> bool:
        return self.file is not None and self.file.suffix == ".model"

    @cached_property
    def _hf(self) -> Any:
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_file(str(self.file))

    @cached_property
    def _sp(self) -> Any:
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(self.file))

    @cached_property
    def _settings(self) -> dict[str, Any]:
        return json_or_empty(self.file.parent / "tokenizer_config.json") if self.file is not None else {}

    @property
    def identity(self) -> str:
        """What the cache key holds: a changed tokenizer file is a new corpus."""
        if self.file is None:
            return "bytes"
        return f"{self.file}:{hashlib.sha256(self.file.read_bytes()).hexdigest()[:16]}"

    @property
    def vocab_size(self) -> int:
        if self.file is None:
            return 256
        return int(self._sp.get_piece_size()) if self.sentencepiece else int(self._hf.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        if self.sentencepiece:
            found = int(self._sp.piece_to_id(token))
            return found if self._sp.id_to_piece(found) == token else None  # an unknown piece maps to <unk>
        found = self._hf.token_to_id(token)
        return None if found is None else int(found)

    @cached_property
    def bos(self) -> int | None:
        """SentencePiece's id put before each document (tokenizer_config.json's add_bos_token, true
        unless it says otherwise, as Llama's tokenizer does); a tokenizer.json's own post-processor adds its own."""
        if not self.sentencepiece or not self._settings.get("add_bos_token", True):
            return None
        token = self._settings.get("bos_token")
        token = token.get("content") if isinstance(token, dict) else token
        found = self.token_id(token) if isinstance(token, str) else None
        return found if found is not None else (int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None)

    @cached_property
    def eos(self) -> int | None:
        """The id that ends a document: tokenizer_config.json's eos_token, else the model's eos_token_id."""
        if self.file is None:
            return EOS
        folder = self.file.parent
        token = self._settings.get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and (found := self.token_id(token)) is not None:
            return found
        for name in ("generation_config.json", "config.json"):
            ids = json_or_empty(folder / name).get("eos_token_id")
            ids = ids[0] if isinstance(ids, list) and ids else ids
            if isinstance(ids, int):
                return ids
        if self.sentencepiece and self._sp.eos_id() >= 0:
            return int(self._sp.eos_id())
        return None

    def encode(self, documents: Sequence[bytes]) -> np.ndarray:
        """One stream: every document's ids, each followed by the end-of-document id."""
        if self.file is None:
            return encode_bytes(bytes([EOS]).join(documents))
        texts = [d.decode("utf-8", errors="replace") for d in documents]
        encoded = self._sp.encode(texts) if self.sentencepiece else [e.ids for e in self._hf.encode_batch(texts)]
        ids: list[int] = []
        for document in encoded:
            if self.bos is not None:
                ids.append(self.bos)
            ids += document
            if self.eos is not None:
                ids.append(self.eos)
        return np.asarray(ids, dtype=np.int64)


def json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON object file (a model directory's settings), or {} if it is missing or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tokenizer_of(cfg: TrainConfig) -> Tokenizer:
    """``data.tokenizer``: ``bytes``; ``auto`` (model.path's tokenizer.json or SentencePiece
    tokenizer.model if it has one, else bytes); or such a file, or a folder holding one."""
    choice = cfg.data.tokenizer
    if choice == "bytes" or (choice == "auto" and not cfg.model.path):
        return Tokenizer()
    folder = Path(cfg.model.path if choice == "auto" else choice)
    found = [folder] if folder.is_file() else [f for f in (folder / "tokenizer.json", folder / "tokenizer.model") if f.is_file()]
    if not found:
        if choice == "auto":
            return Tokenizer()  # a model directory without a tokenizer: bytes
        raise ConfigError(
            "data.tokenizer", choice, "neither bytes, auto, a tokenizer.json, a tokenizer.model nor a folder holding one"
        )
    tokenizer = Tokenizer(found[0])  # tokenizer.json first, as transformers' fast tokenizers do
    try:
        tokenizer.vocab_size  # noqa: B018  (reads the file)
    except ImportError:
        raise ConfigError("data.tokenizer", str(found[0]), "needs the sentencepiece package: pip install 'fmtrain[hf]'") from None
    except Exception as error:  # the tokenizer libraries' own errors: a file they cannot read
        raise ConfigError("data.tokenizer", str(found[0]), f"cannot be read: {type(error).__name__}: {error}") from None
    return tokenizer


def _cache_key(cfg: DataConfig, files: list[Path], vocab_size: int, tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    settings = [FORMAT_VERSION, tokenizer.identity, vocab_size, cfg.val_fraction, cfg.max_bytes, cfg.shard_tokens]
    digest.update(json.dumps(settings).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _read_corpus(files: list[Path], max_bytes: int) -> list[bytes]:
    parts, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        text = path.read_bytes()[: max_bytes - total]
        parts.append(text)
        total += len(text) + 1
    return parts


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


def _write_shards(tokens: np.ndarray, directory: Path, split: str, shard_tokens: int) -> list[str]:
    names = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        name = f"{split}_{index:03d}.bin"
        tokens[start : start + shard_tokens].tofile(directory / name)
        names.append(name)
    return names


def _build(cfg: DataConfig, files: list[Path], vocab_size: int, target: Path, tokenizer: Tokenizer) -> None:
    stream = tokenizer.encode(_read_corpus(files, cfg.max_bytes)).astype(token_dtype(vocab_size))
    block, val_blocks = _split_blocks(len(stream), cfg.val_fraction)
    is_val = np.zeros(len(stream), dtype=bool)
    for b in val_blocks:
        is_val[b * block : (b + 1) * block] = True
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        meta = {
            "format": FORMAT_VERSION,
            "dtype": np.dtype(token_dtype(vocab_size)).name,
            "vocab_size": vocab_size,
            "files": len(files),
            "tokenizer": tokenizer.identity,
            "train": _write_shards(stream[~is_val], staging, "train", cfg.shard_tokens),
            "val": _write_shards(stream[is_val], staging, "val", cfg.shard_tokens),
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

    def __init__(self, directory: Path, names: list[str], dtype: str) -> None:
        self.arrays = [np.memmap(directory / n, dtype=dtype, mode="r") for n in names]

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def num_windows(self, seq_len: int) -> int:
        return sum((len(a) - 1) // seq_len for a in self.arrays)

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
    directory: Path
    meta: dict

    @cached_property
    def train(self) -> TokenShards:
        return TokenShards(self.directory, self.meta["train"], self.meta["dtype"])

    @cached_property
    def val(self) -> TokenShards:
        return TokenShards(self.directory, self.meta["val"], self.meta["dtype"])


def cache_path(cfg: DataConfig, vocab_size: int, tokenizer: Tokenizer = Tokenizer()) -> Path:
    files = corpus_files(cfg)
    if not files:
        raise FileNotFoundError(f"data.paths={cfg.paths!r} matches no file")
    root = Path(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else cache_root() / "data"
    return root / _cache_key(cfg, files, vocab_size, tokenizer)


def prepare(cfg: DataConfig, vocab_size: int, tokenizer: Tokenizer = Tokenizer()) -> Corpus:
    """Tokenize the corpus into shards unless an identical cache exists; return it opened.

    Safe to call from several processes at once: each builds in a private staging folder and the
    first atomic rename wins.
    """
    target = cache_path(cfg, vocab_size, tokenizer)
    if not (target / "meta.json").exists():
        _build(cfg, corpus_files(cfg), vocab_size, target, tokenizer)
    return Corpus(target, json.loads((target / "meta.json").read_text()))


class GlobalBatches:
    """Deterministic global batches over a split: a fresh seeded permutation every epoch."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int) -> None:
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
        rows = self.shards.windows([self._window_of(first + i) for i in range(micro_batch)], self.seq_len)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def eval_windows(shards: TokenShards, seq_len: int, count: int) -> list[int]:
    """``count`` validation windows spread evenly over the split (repeating if it is short)."""
    total = shards.num_windows(seq_len)
    if total < 1:
        raise ValueError(f"the validation split holds {shards.num_tokens} tokens, fewer than one window of {seq_len + 1}")
    stride = max(1, total // count)
    return [(i * stride) % total for i in range(count)]
