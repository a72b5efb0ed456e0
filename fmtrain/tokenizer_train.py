"""``fmtrain tokenizer train``: a byte-level BPE trained with Hugging Face's ``tokenizers`` on a run's data.

    written = train_tokenizer(cfg.data, vocab_size=8192, out=Path("tok"))
    # tok/tokenizer.json, tok/tokenizer_config.json, tok/special_tokens_map.json, tok/training.json

GPT-2's scheme (bytes mapped to printable characters, split on words, digits and whitespace), so
every input is encoded without an unknown token. The folder is what ``data.tokenizer=DIR`` reads,
and what transformers' ``AutoTokenizer.from_pretrained`` loads (``PreTrainedTokenizerFast``): the
end-of-text token ends each document in both. Nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmtrain.config import ConfigError, DataConfig
from fmtrain.examples import CHATML
from fmtrain.sources import BadRecords, source_of

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>")  # and chatml's turn markers, one id each
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, and the special tokens


def _texts(cfg: DataConfig, bad: BadRecords, counts: dict[str, int]) -> Iterator[str]:
    """The source's documents as text, up to ``data.max_bytes`` bytes, as training reads them."""
    source = source_of(cfg)
    if source.kind != "text":
        raise ConfigError("data.name", cfg.name, "holds token ids already; train a tokenizer on text (jsonl, parquet, ...)")
    for document in source.documents(bad, utf8=True):
        if counts["bytes"] >= cfg.max_bytes:
            return
        document = document[: cfg.max_bytes - counts["bytes"]]
        counts["bytes"] += len(document) + 1
        counts["documents"] += 1
        yield document.decode("utf-8", errors="ignore")  # whole characters: only a cut at data.max_bytes splits one


def train_tokenizer(cfg: DataConfig, vocab_size: int, out: Path, min_frequency: int = 2) -> dict[str, Any]:
    """Train, write ``out`` (replacing the files it writes), and return what ``training.json`` records."""
    if vocab_size < MIN_VOCAB or vocab_size > 1 << 24:
        raise ConfigError(
            "tokenizer.vocab_size",
            vocab_size,
            f"must be between {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens) and 16777216",
        )
    if min_frequency < 1:
        raise ConfigError("tokenizer.min_frequency", min_frequency, "must be at least 1")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise ConfigError("tokenizer", "train", "needs the tokenizers package: pip install 'fmtrain[hf]'") from None

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bad = BadRecords(cfg.on_bad_record)
    counts = {"documents": 0, "bytes": 0}
    started = time.perf_counter()
    tokenizer.train_from_iterator(_texts(cfg, bad, counts), trainer=trainer)
    seconds = time.perf_counter() - started
    if counts["documents"] == 0:
        raise ConfigError("data.paths", cfg.paths, "holds no document to train a tokenizer on")

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    specials = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None, "bos_token": None}
    settings = {
        **specials,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        "chat_template": CHATML,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in specials.items() if v}, indent=1) + "\n")
    record = {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "source": cfg.name,
        "paths": list(cfg.paths),
        "documents": counts["documents"],
        "bytes": counts["bytes"],
        "bad_records": bad.as_dict(),
        "seconds": round(seconds, 2),
        "eos_token": EOS_TOKEN,
        "eos_id": tokenizer.token_to_id(EOS_TOKEN),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
