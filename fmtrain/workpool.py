"""Tokenizing in ``data.num_workers`` processes, in input order, with a progress line.

    for ids in ordered_map(make_encoder, (tokenizer_file,), batches, workers=4):
        out.write(ids)                      # the same bytes, in the same order, as with workers=1

``make(*args)`` builds the function once per process (a tokenizer is loaded once, not per item).
With one worker it runs here. With more, the items go to spawned processes, at most two per worker
in flight, so memory stays bounded whatever the input's size; the reading (and its bad-record
checks, with their file and line) stays in this process, in order, and an item's error reaches
the caller in order too, so the first bad record is still the one reported. Each worker keeps the
``tokenizers`` library to one thread of its own: the processes are the parallelism.

:class:`Progress` logs a bar every ``interval`` seconds while a build runs, and one line when it ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("fmtrain")

_work: Callable[[Any], Any] | None = None  # in a worker: what make(*args) built


def _start(make: Callable[..., Callable[[Any], Any]], args: tuple[Any, ...]) -> None:
    global _work
    os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.getLogger("fmtrain").addHandler(logging.NullHandler())  # what a worker has to say, it returns
    _work = make(*args)


def _call(item: Any) -> Any:
    assert _work is not None, "a worker runs _start first"
    return _work(item)


def ordered_map(
    make: Callable[..., Callable[[Any], Any]], args: tuple[Any, ...], items: Iterable[Any], workers: int
) -> Iterator[Any]:
    """``make(*args)(item)`` for each item, in order, here or in ``workers`` processes.

    ``make`` and ``args`` are pickled to each worker (``make`` is a module-level function)."""
    work = make(*args)  # here first: a tokenizer or template that cannot be loaded is its own error, not a broken pool
    if workers <= 1:
        for item in items:
            yield work(item)
        return
    from concurrent.futures import Future, ProcessPoolExecutor

    # spawn: a training rank has torch's threads running, which fork would copy half-held
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=(make, args))
    pending: deque[Future[Any]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(_call, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """``data: tokenizing jsonl [#######.............]  35% 22.4 of at most 64.0 MB, 2.10 MB/s, 11,203,114 tokens, 2 workers``

    ``total`` (bytes) is an upper bound where it is known (None: no percentage)."""

    WIDTH = 20

    def __init__(self, what: str, total: int | None, workers: int, interval: float = 10.0) -> None:
        self.what, self.total, self.workers, self.interval = what, total, workers, interval
        self.done = self.tokens = self.items = 0
        self.start = self.said = time.perf_counter()

    def advance(self, done: int = 0, tokens: int = 0, items: int = 0) -> None:
        self.done, self.tokens, self.items = self.done + done, self.tokens + tokens, self.items + items
        if time.perf_counter() - self.said >= self.interval:
            self.said = time.perf_counter()
            log.info("%s", self.line())

    def line(self, final: bool = False) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        mb = self.done / 1e6
        parts = []
        if self.done:  # text, by its bytes
            parts.append(f"{mb:.1f} MB" if self.total is None or final else f"{mb:.1f} of at most {self.total / 1e6:.1f} MB")
            parts.append(f"{mb / seconds:.2f} MB/s")
        if self.items:  # examples, by their records
            parts.append(f"{self.items:,} examples ({self.items / seconds:,.0f}/s)")
        parts.append(f"{self.tokens:,} tokens")
        parts.append(f"{self.workers} worker{'s' if self.workers > 1 else ''}")
        if final:
            return f"data: tokenized {self.what} in {seconds:.1f} s: " + ", ".join(parts)
        bar = ""
        if self.total:
            share = min(self.done / self.total, 1.0)
            filled = round(share * self.WIDTH)
            bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {share:4.0%} "
        return f"data: tokenizing {self.what} {bar}" + ", ".join(parts)

    def finish(self) -> None:
        log.info("%s", self.line(final=True))
