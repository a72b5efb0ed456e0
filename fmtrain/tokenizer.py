"""How text becomes token ids: fmtrain's bytes, a Hugging Face ``tokenizer.json`` or a SentencePiece
``tokenizer.model``, with the special ids and chat settings of the folder they are in.

    tokenizer = tokenizer_of(cfg)              # data.tokenizer: bytes, auto (model.path's), a file or a folder
    tokenizer.encode([b"a document", b"another"])  # ids, each document followed by the end-of-document id
    tokenizer.encode_spans("<|im_start|>user...")  # a whole text's ids and each one's characters (chats)

No torch here: what a tokenizing worker process (``data.num_workers``) needs to encode loads in a
fraction of a second (one spawned from a training rank imports the rank's main module as well).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fmtrain.config import ConfigError, TrainConfig

EOS = 0
SETTINGS_FILES = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json", "config.json")


def encode_bytes(text: bytes) -> np.ndarray:
    """The byte tokenizer: every byte is its own token."""
    return np.frombuffer(text, dtype=np.uint8)


@dataclass(frozen=True)
class Tokenizer:
    """How text becomes token ids: fmtrain's bytes, a Hugging Face ``tokenizer.json`` (the
    ``tokenizers`` library) or a SentencePiece ``tokenizer.model`` (the ``sentencepiece`` library)."""

    file: Path | None = None  # None: the byte tokenizer

    def __reduce__(self) -> tuple[type, tuple[Path | None]]:  # to a tokenizing worker: the file, not the loaded library object
        return type(self), (self.file,)

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
        """What the cache key holds: a changed tokenizer file, or a changed file beside it that decides
        its special ids or chat template (tokenizer_config.json, ...), is a new corpus."""
        if self.file is None:
            return "bytes"
        digest = hashlib.sha256(self.file.read_bytes())
        for name in SETTINGS_FILES:
            if (self.file.parent / name).is_file():
                digest.update(name.encode() + b"\0" + (self.file.parent / name).read_bytes())
        return f"{self.file}:{digest.hexdigest()[:16]}"

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

    def encode_piece(self, text: str) -> list[int]:
        """Ids of a piece of text as it is, adding no special token (a chat turn, a prompt)."""
        if self.file is None:
            return list(text.encode("utf-8"))
        if self.sentencepiece:
            return [int(i) for i in self._sp.encode(text)]
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a whole text, adding no special token (a rendered chat: special tokens written in it
        are read as such by a tokenizer.json), and the characters of ``text`` each token covers."""
        if self.file is not None and not self.sentencepiece:
            encoding = self._hf.encode(text, add_special_tokens=False)
            return list(encoding.ids), [(int(a), int(b)) for a, b in encoding.offsets]
        if self.file is None:  # a token a byte
            return list(text.encode("utf-8")), [(i, i + 1) for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        found = self._sp.encode(text, return_type="offset_mapping")  # characters (sentencepiece >= 0.2.3)
        return [int(i) for i in found["ids"]], [(int(a), int(b)) for a, b in found["offsets"]]

    def _token_text(self, name: str) -> str | None:
        token = self._settings.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return token if isinstance(token, str) else None

    def special_texts(self) -> dict[str, str]:
        """What chat templates call ``bos_token`` and ``eos_token``."""
        return {name: self._token_text(name) or "" for name in ("bos_token", "eos_token")}

    @cached_property
    def pad(self) -> int:
        """The id padding is made of (never in the loss): tokenizer_config.json's pad_token, else EOS, else 0."""
        token = self._token_text("pad_token") if self.file is not None else None
        found = self.token_id(token) if token else None
        return found if found is not None else (self.eos if self.eos is not None else 0)

    def encode(self, documents: Sequence[bytes], *, first: bool = True) -> np.ndarray:
        """One stream: every document's ids, each followed by the end-of-document id (bytes: a 0 byte
        between documents; ``first=False``: these follow earlier ones, so one comes before them too)."""
        if self.file is None:
            return encode_bytes((b"" if first else bytes([EOS])) + bytes([EOS]).join(documents))
        texts = [d.decode("utf-8", errors="replace") for d in documents]
        if self.sentencepiece:
            encoded = self._sp.encode(texts)
        else:  # ids only: encode_batch_fast skips the offsets (tokenizers >= 0.21), ~20% faster
            encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
            encoded = [e.ids for e in encode(texts)]
        ids: list[int] = []
        for document in encoded:
            if self.bos is not None:
                ids.append(self.bos)
            ids += document
            if self.eos is not None:
                ids.append(self.eos)
        return np.asarray(ids, dtype=np.int64)


BYTES = Tokenizer()  # fmtrain's own: a token a byte


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


def stream_encoder(file: str | None, dtype: str) -> Callable[[tuple[list[bytes], bool, int]], tuple[np.ndarray, int]]:
    """What encodes one batch of documents in a worker of :func:`~fmtrain.workpool.ordered_map`."""
    tokenizer = Tokenizer(Path(file) if file is not None else None)

    def encode(item: tuple[list[bytes], bool, int]) -> tuple[np.ndarray, int]:
        documents, first, size = item
        return tokenizer.encode(documents, first=first).astype(dtype), size

    return encode
