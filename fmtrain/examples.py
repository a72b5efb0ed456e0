"""Fine-tuning examples (``data.packing=none``): each record one example, only its answers in the loss.

A record is ``{"prompt": ..., "completion": ...}``, ``{"messages": [{"role": ..., "content": ...}, ...]}``
(rendered with the chat template), or a plain ``data.text_field`` (all of it counts). Each example
becomes its ids and a target mask (1 where a token is to be predicted: the completion and the
end-of-sequence id, or each assistant turn), cached as three files per split::

    train_ids.bin  train_mask.bin  train_offsets.npy      (example i: ids[offsets[i]:offsets[i+1]])

and a batch is examples padded to ``seq_len + 1``, with ``loss_mask`` 0 on the prompt (unless
``data.train_on_prompt``) and on padding. The sampler is :class:`~fmtrain.data.GlobalBatches` over
examples instead of windows: one number of state, exact resume on any world size.

A conversation is rendered whole with the template and tokenized at once, so its ids are those
transformers' ``apply_chat_template`` gives (a SentencePiece model marks word starts where the text
has them, not at every turn); a token is a target where it holds characters of an assistant turn.
A prompt and its completion are tokenized apart: the prompt's ids are those it has alone at inference.

EOS: a completion ends with the tokenizer's own end-of-sequence id. A chat template whose assistant
turns do not end with it (chatml's ``<|im_end|>`` beside an ``<|endoftext|>`` EOS) gets the EOS
appended after each assistant turn, said once in the log, so a fine-tuned model stops where its
tokenizer says it does (the mismatch behind TRL #3299 and peft #1003).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmtrain.config import ConfigError, DataConfig
from fmtrain.sources import BadRecords, DataError, Source
from fmtrain.workpool import Progress, ordered_map

if TYPE_CHECKING:  # torch is imported where batches are made: a tokenizing worker process starts without it
    import torch

log = logging.getLogger("fmtrain")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
EXAMPLES_FORMAT = 2  # in the cache key: 2, chats tokenized whole (1 tokenized them a turn at a time)
CHUNK_RECORDS = 256  # records encoded at once (by one worker)
NOT_PREFIXES = "does not render a conversation's first turns as the start of the whole (each turn's mask needs it)"


def chat_template_text(cfg: DataConfig, tokenizer_folder: Path | None) -> str:
    """``data.chat_template``: auto (the tokenizer folder's, else chatml), chatml, or a Jinja file."""
    if cfg.chat_template == "chatml":
        return CHATML
    if cfg.chat_template != "auto":
        path = Path(cfg.chat_template).expanduser()
        if not path.is_file():
            raise ConfigError("data.chat_template", cfg.chat_template, "must be auto, chatml or a Jinja template file")
        return path.read_text()
    if tokenizer_folder is not None:
        if (tokenizer_folder / "chat_template.jinja").is_file():
            return (tokenizer_folder / "chat_template.jinja").read_text()
        try:
            found = json.loads((tokenizer_folder / "tokenizer_config.json").read_text()).get("chat_template")
        except (OSError, ValueError):
            found = None
        if isinstance(found, str):
            return found
    return CHATML


def compile_template(text: str) -> Callable[..., str]:
    """A Jinja template in a sandbox, as transformers renders chat templates."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(text).render
    except TemplateError as error:
        raise ConfigError("data.chat_template", text[:60], f"is not a Jinja template: {error}") from None


class ExampleEncoder:
    """Turns records into (ids, target mask); None for a bad record (counted or raised by ``bad``)."""

    def __init__(self, cfg: DataConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        folder = tokenizer.file.parent if tokenizer.file is not None else None
        self.render = compile_template(chat_template_text(cfg, folder))
        self.specials = tokenizer.special_texts()
        self.eos_appended = False  # the template's assistant turns lacked EOS: build_examples says so once

    def _piece(self, text: str) -> list[int]:
        return self.tokenizer.encode_piece(text)

    def _prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        head = ([self.tokenizer.bos] if self.tokenizer.bos is not None else []) + self._piece(prompt)
        tail = self._piece(completion) + ([self.tokenizer.eos] if self.tokenizer.eos is not None else [])
        return head + tail, [0] * len(head) + [1] * len(tail)

    def _messages(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """The whole conversation rendered, then tokenized at once (the ids transformers'
        ``apply_chat_template`` gives), each token a target where it holds characters of an assistant
        turn: what the template adds after the generation prompt, up to the end of that turn."""
        spans: list[tuple[int, int]] = []  # the characters of each assistant turn
        done = ""
        for i, message in enumerate(messages):
            closed = self.render(messages=messages[: i + 1], add_generation_prompt=False, **self.specials)
            if message["role"] == "assistant":
                opened = self.render(messages=messages[:i], add_generation_prompt=True, **self.specials)
                if not opened.startswith(done) or not closed.startswith(opened):
                    raise ConfigError("data.chat_template", self.cfg.chat_template, NOT_PREFIXES)
                spans.append((len(opened), len(closed)))
            elif not closed.startswith(done):
                raise ConfigError("data.chat_template", self.cfg.chat_template, NOT_PREFIXES)
            done = closed
        tokens, offsets = self.tokenizer.encode_spans(done)
        ids: list[int] = []
        mask: list[int] = []
        eos = self.tokenizer.eos
        at = 0
        for begin, end in spans:
            while at < len(tokens) and offsets[at][1] <= begin:  # before the turn (a token across its start is in it)
                ids.append(tokens[at])
                mask.append(0)
                at += 1
            first = len(ids)
            while at < len(tokens) and offsets[at][0] < end:
                ids.append(tokens[at])
                mask.append(1)
                at += 1
            if eos is not None and eos not in ids[first:]:  # the turn ends without the tokenizer's EOS
                ids.append(eos)
                mask.append(1)
                self.eos_appended = True
        ids += tokens[at:]
        mask += [0] * (len(tokens) - at)
        return ids, mask

    def encode(self, record: dict[str, Any], file: Path, where: str, bad: BadRecords) -> tuple[list[int], list[int]] | None:
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages:
                bad(file, where, "field 'messages' is not a list of messages")
                return None
            for n, message in enumerate(messages):
                if (
                    not isinstance(message, dict)
                    or message.get("role") not in ROLES
                    or not isinstance(message.get("content"), str)
                ):
                    bad(file, where, f"message {n} is not {{role: {'|'.join(ROLES)}, content: text}}")
                    return None
            if not any(m["role"] == "assistant" for m in messages):
                bad(file, where, "has no assistant message: nothing to learn")
                return None
            from jinja2 import TemplateError

            try:
                ids, mask = self._messages(messages)
            except TemplateError as error:
                bad(file, where, f"the chat template failed: {error}")
                return None
        elif "prompt" in record or "completion" in record:
            prompt, completion = record.get("prompt"), record.get("completion")
            for name, value in (("prompt", prompt), ("completion", completion)):
                if not isinstance(value, str):
                    bad(file, where, f"field {name!r} is {'missing' if value is None else type(value).__name__}, not text")
                    return None
            if not completion:
                bad(file, where, "field 'completion' is empty")
                return None
            ids, mask = self._prompt_completion(str(prompt), str(completion))
        elif isinstance(text := record.get(self.cfg.text_field), str) and text:
            ids, mask = self._prompt_completion("", text)
        else:
            fields = ", ".join(map(repr, list(record)[:10])) or "none"
            wanted = f"prompt and completion, messages nor a {self.cfg.text_field!r} text"
            bad(file, where, f"has neither {wanted}; its fields: {fields}")
            return None
        if self.cfg.train_on_prompt:
            mask = [1] * len(ids)
        return ids, mask


class _SplitWriter:
    def __init__(self, directory: Path, split: str, dtype: type) -> None:
        self.ids = open(directory / f"{split}_ids.bin", "wb")  # noqa: SIM115 (closed by close())
        self.mask = open(directory / f"{split}_mask.bin", "wb")  # noqa: SIM115
        self.offsets, self.dtype, self.directory, self.split = [0], dtype, directory, split

    def write(self, ids: list[int], mask: list[int]) -> None:
        self.ids.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self) -> int:
        self.ids.close()
        self.mask.close()
        np.save(self.directory / f"{self.split}_offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        return len(self.offsets) - 1


def build_examples(cfg: DataConfig, source: Source, tokenizer: Any, staging: Path, dtype: type) -> dict[str, Any]:
    """Write each split's examples into ``staging``; return what meta.json records of them."""
    bad = BadRecords(cfg.on_bad_record)
    writers = {split: _SplitWriter(staging, split, dtype) for split in ("train", "val")}
    limit = cfg.seq_len + 1
    counts = {"examples": 0, "truncated": 0, "dropped": 0, "targets": 0}
    progress = Progress(f"examples of {cfg.name}", None, cfg.num_workers)
    said_eos = False

    def encoded() -> Iterator[tuple[Path, str, tuple[list[int], list[int]] | None]]:
        nonlocal said_eos
        for chunk, read_skips, (results, encode_skips, eos_appended) in encoded_chunks(source, cfg, tokenizer):
            for skipped in (read_skips, encode_skips):
                bad.count += skipped["count"]
                bad.first += skipped["first"][: 5 - len(bad.first)]
            if eos_appended and not said_eos:
                said_eos = True
                log.warning(
                    "the chat template does not end an assistant turn with the tokenizer's EOS (id %d): "
                    "it is appended after each assistant turn, so the model learns to stop", tokenizer.eos,
                )  # fmt: skip
            for (file, where, _), result in zip(chunk, results, strict=True):
                yield file, where, result

    for index, (file, where, result) in enumerate(encoded()):
        if result is None:
            continue
        ids, mask = result
        progress.advance(tokens=len(ids), items=1)
        if len(ids) > limit:
            if cfg.overlong == "drop":
                counts["dropped"] += 1
                continue
            ids, mask = ids[:limit], mask[:limit]
            counts["truncated"] += 1
        if not any(mask[1:]):  # the first token is never a target
            bad(file, where, "has no answer token left to learn (after truncation to data.seq_len)")
            continue
        is_val = zlib.crc32(f"example {index}".encode()) % 1_000_000 < cfg.val_fraction * 1_000_000
        writers["val" if is_val else "train"].write(ids, mask)
        counts["examples"] += 1
        counts["targets"] += sum(mask[1:])
    found = {split: writer.close() for split, writer in writers.items()}
    progress.finish()
    if cfg.packing == "bfd":
        for split in writers:
            offsets = np.load(staging / f"{split}_offsets.npy")
            members, starts = best_fit_decreasing(np.diff(offsets), limit)
            np.save(staging / f"{split}_bin_members.npy", members)
            np.save(staging / f"{split}_bin_offsets.npy", starts)
    if not found["train"] or not found["val"]:
        held = f"holds {found['train']} training and {found['val']} validation examples"
        raise ConfigError("data.paths", cfg.paths, f"{held}; both need one at least (data.val_fraction={cfg.val_fraction})")
    overlong = {k: counts[k] for k in ("truncated", "dropped")}
    return {"examples": found, "overlong": overlong, "targets": counts["targets"], "bad_records": bad.as_dict()}


Records = list[tuple[Path, str, dict[str, Any]]]


def encoded_chunks(source: Source, cfg: DataConfig, tokenizer: Any) -> Iterator[tuple[Records, dict[str, Any], Any]]:
    """The records in chunks of ``CHUNK_RECORDS``, each with the records skipped while reading it and
    its encoding, made in ``data.num_workers`` processes. The same chunks and the same counts for any
    number of workers; a record that cannot be read (``data.on_bad_record=error``) is raised in its
    place, after the encoding of the records before it."""
    held: deque[tuple[Records, dict[str, Any]]] = deque()

    def chunks() -> Iterator[Records | DataError]:
        reading = BadRecords(cfg.on_bad_record)
        chunk: Records = []

        def cut() -> Records:
            nonlocal chunk
            held.append((chunk, reading.as_dict()))
            reading.count, reading.first, done, chunk = 0, [], chunk, []
            return done

        try:
            for found in source.records(reading):
                chunk.append(found)
                if len(chunk) == CHUNK_RECORDS:
                    yield cut()
        except DataError as error:
            if chunk:
                yield cut()
            yield error
            return
        if chunk or reading.count:
            yield cut()

    for result in ordered_map(_chunk_encoder, (cfg, tokenizer), chunks(), cfg.num_workers):
        chunk, read_skips = held.popleft()
        yield chunk, read_skips, result


def _chunk_encoder(cfg: DataConfig, tokenizer: Any) -> Callable[[Records | DataError], Any]:
    """What encodes a chunk of records in a worker: each one's (ids, mask) or None, the records skipped
    (``data.on_bad_record=skip``; with ``error`` the first bad one raises), and whether EOS was appended."""
    encoder = ExampleEncoder(cfg, tokenizer)

    def encode(chunk: Records | DataError) -> tuple[list[Any], dict[str, Any], bool]:
        if isinstance(chunk, DataError):  # met while reading: raised in its place in the order
            raise chunk
        bad = BadRecords(cfg.on_bad_record)
        results = [encoder.encode(record, file, where, bad) for file, where, record in chunk]
        return results, bad.as_dict(), encoder.eos_appended

    return encode


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples into bins of ``capacity`` tokens: longest first, each into the fullest bin it fits
    (a new one if none). Returns the examples of all bins in order and each bin's start in that list;
    deterministic (ties: the lower example index, the older bin)."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: dict[int, list[int]] = {}  # room left -> the bins with that much room
    rooms: list[int] = []  # the distinct rooms of the bins in ``free``, sorted
    for example in order:
        length = int(lengths[example])
        at = bisect.bisect_left(rooms, length)
        if at == len(rooms):
            bins.append([])
            target, room = len(bins) - 1, capacity
        else:
            room = rooms[at]
            target = free[room].pop(0)
            if not free[room]:
                del free[room]
                rooms.pop(at)
        bins[target].append(example)
        room -= length
        if room > 0:
            if room not in free:
                free[room] = []
                bisect.insort(rooms, room)
            free[room].append(target)
    members = np.asarray([e for b in bins for e in b], dtype=np.int64)
    starts = np.cumsum([0, *(len(b) for b in bins)]).astype(np.int64)
    return members, starts


class ExampleShards:
    """One split's examples: ``num_windows`` is the number of examples; a batch pads each to ``seq_len + 1``."""

    def __init__(self, directory: Path, split: str, dtype: str, pad: int) -> None:
        self.ids = np.memmap(directory / f"{split}_ids.bin", dtype=dtype, mode="r")
        self.mask = np.memmap(directory / f"{split}_mask.bin", dtype=np.uint8, mode="r")
        self.offsets = np.load(directory / f"{split}_offsets.npy")
        self.pad = pad

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def num_windows(self, seq_len: int) -> int:
        return len(self.offsets) - 1

    def batch(self, indices: list[int], seq_len: int) -> dict[str, torch.Tensor]:
        import torch

        rows = np.full((len(indices), seq_len + 1), self.pad, dtype=np.int64)
        targets = np.zeros((len(indices), seq_len + 1), dtype=np.int64)
        for row, index in enumerate(indices):
            start, end = int(self.offsets[index]), int(self.offsets[index + 1])
            end = min(end, start + seq_len + 1)
            rows[row, : end - start] = self.ids[start:end]
            targets[row, : end - start] = self.mask[start:end]
        tokens, mask = torch.from_numpy(rows), torch.from_numpy(targets)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask[:, 1:]}


class PackedShards(ExampleShards):
    """``data.packing=bfd``: a row is a bin of whole examples; ``position_ids`` restart at each example
    and ``document_ids`` (the example's number in its row; -1 for padding) keep attention within it."""

    def __init__(self, directory: Path, split: str, dtype: str, pad: int) -> None:
        super().__init__(directory, split, dtype, pad)
        self.members = np.load(directory / f"{split}_bin_members.npy")
        self.starts = np.load(directory / f"{split}_bin_offsets.npy")

    def num_windows(self, seq_len: int) -> int:
        return len(self.starts) - 1

    def batch(self, indices: list[int], seq_len: int) -> dict[str, torch.Tensor]:
        import torch

        width = seq_len + 1
        rows = np.full((len(indices), width), self.pad, dtype=np.int64)
        targets = np.zeros((len(indices), width), dtype=np.int64)
        positions = np.zeros((len(indices), width), dtype=np.int64)
        documents = np.full((len(indices), width), -1, dtype=np.int64)
        for row, index in enumerate(indices):
            at = 0
            for number, example in enumerate(self.members[self.starts[index] : self.starts[index + 1]]):
                start, end = int(self.offsets[example]), int(self.offsets[example + 1])
                n = end - start
                rows[row, at : at + n] = self.ids[start:end]
                targets[row, at + 1 : at + n] = self.mask[start + 1 : end]  # an example's first token is no target
                positions[row, at : at + n] = np.arange(n)
                documents[row, at : at + n] = number
                at += n
        tokens, mask = torch.from_numpy(rows), torch.from_numpy(targets)
        return {
            "input_ids": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": mask[:, 1:],
            "position_ids": torch.from_numpy(positions[:, :-1]),
            "document_ids": torch.from_numpy(documents[:, :-1]),
        }
