"""Distributed checkpoints that are complete or absent, checked before they are trusted.

Layout of one checkpoint (``checkpoints/step_000100/``):

    model_optim/        torch.distributed.checkpoint of model + optimizer (any world size loads it)
    rng/rank<R>.pt      each rank's torch and Python RNG states (tensors and ints only)
    trainer_state.json  step, samples consumed, best validation loss
    manifest.json       step, world size, strategy, config hash, sha256 of every file above

Every rank writes into ``.step_000100.tmp``; rank 0 writes the manifest last and renames the folder,
so a run killed mid-save leaves only a temporary folder that the next save removes. On resume
rank 0 picks the newest checkpoint whose manifest and checksums hold, warns about each one it skips,
and tells the other ranks. Loading uses ``weights_only`` everywhere: no code is unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from fmtrain.config import ConfigError
from fmtrain.distributed import DistEnv
from fmtrain.manifests import (
    BEST,
    MANIFEST,
    CheckpointError,
    every_checkpoint_invalid,
    files_under,
    invalid_checkpoints,
    list_checkpoints,
    newest_valid,
    read_best,
    sha256,
    step_dir_name,
    verify,
)
from fmtrain.strategies import Strategy

log = logging.getLogger("fmtrain")


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """DCP warns when no process group exists; for one process that is the intended use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _written_digests(write: Future[Any], staging: Path) -> dict[str, str]:
    """After a background write: the checksum of every file in ``staging`` (on rank 0's checksum thread)."""
    write.result()
    return {str(p.relative_to(staging)): sha256(p) for p in files_under(staging)}


def _tensors(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a (nested) state dict; a sharded one counts whole (what all ranks write)."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from _tensors(value)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class _InFlight:
    """A checkpoint whose files are being written in the background (``checkpoint.async``)."""

    step: int
    staging: Path
    final: Path
    future: Future[Any]
    state: dict[str, Any]  # for the size of a failed write
    trainer_state: dict[str, Any]
    blocked_s: float  # how long the training loop waited for this save
    started: float


class Checkpointer:
    """Saves and restores the whole training state of one run under ``root``.

    With ``asynchronous``, :meth:`save` returns once the state is copied (DCP's staging) and the files
    are written by a background thread; :meth:`poll` at each step boundary completes the checkpoint
    (manifest, rename) once every rank's write has finished, and :meth:`finish` waits for it. At most
    one save is in flight: the next one waits for the last.
    """

    def __init__(
        self,
        root: Path,
        env: DistEnv,
        strategy: Strategy,
        *,
        keep_last: int,
        keep_best: bool,
        identity: dict[str, Any],
        asynchronous: bool = False,
    ) -> None:
        self.root, self.env, self.strategy = root, env, strategy
        self.keep_last, self.keep_best = keep_last, keep_best
        self.identity = identity  # strategy, config hash: written into every manifest
        self.asynchronous = asynchronous
        self.in_flight: _InFlight | None = None
        # The background write's own collectives run on a gloo group of their own, never interleaved
        # with the training's on the default group.
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self._checksums: ThreadPoolExecutor | None = None  # rank 0's checksums of a background write
        self._stager: Any = None  # DCP's stager, kept: its CPU copy of the state is reused by every save

    def save(self, step: int, wrapped: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]) -> Path | None:
        """Write the checkpoint of ``step``; return its folder, or None while it is written in the background."""
        started = time.perf_counter()
        self.finish()
        final = self.root / step_dir_name(step)
        staging = self.root / f".{final.name}.tmp"
        state = self.strategy.state_dict(wrapped, optimizer)
        try:
            self._prepare(staging)
            if self.asynchronous:
                import torch.distributed.checkpoint as dcp

                write = dcp.async_save(
                    state, checkpoint_id=staging / "model_optim", process_group=self.group, async_stager=self._staging(wrapped)
                )
                assert isinstance(write, Future)  # the stager copies before returning: no staging future
                # Rank 0's write ends after every rank's (DCP gathers their results to write its metadata):
                # rank 0 then checksums the files in the background too.
                future = self._background().submit(_written_digests, write, staging) if self.env.is_main else write
                blocked = time.perf_counter() - started
                self.in_flight = _InFlight(step, staging, final, future, state, trainer_state, blocked, started)
                return None
            self._write(state, staging)
            self._complete(step, staging, final, trainer_state)
        except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
            self._failed(staging, final, state, error)
        if self.env.is_main:
            log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - started)
        self.env.barrier()
        return final

    def poll(self) -> Path | None:
        """At a step boundary (every rank): complete the checkpoint written in the background once
        every rank's write has finished; its folder, or None."""
        if self.in_flight is None:
            return None
        # On the training's group, from the training's thread: the background write's collectives
        # have the other group to themselves.
        device = (
            torch.device("cuda", torch.cuda.current_device()) if self.env.distributed and dist.get_backend() == "nccl" else None
        )
        done = torch.tensor([float(self.in_flight.future.done())], device=device)
        if self.env.distributed:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.finish() if done.item() else None

    def finish(self) -> Path | None:
        """Wait for the checkpoint written in the background and complete it; its folder, or None."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return None
        waited = time.perf_counter()
        try:
            digests = flight.future.result()
            self._complete(flight.step, flight.staging, flight.final, flight.trainer_state, digests)
        except (Exception, CheckpointException) as error:
            self._failed(flight.staging, flight.final, flight.state, error)
        self.env.barrier()
        if self.env.is_main:
            blocked = flight.blocked_s + time.perf_counter() - waited
            log.info(
                "saved checkpoint %s in %.2fs, written in the background: training waited %.2fs",
                flight.final,
                time.perf_counter() - flight.started,
                blocked,
            )
        return flight.final

    def _prepare(self, staging: Path) -> None:
        if self.env.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.env.barrier()
        (staging / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), staging / "rng" / f"rank{self.env.rank}.pt")

    def _write(self, state: dict[str, Any], staging: Path) -> None:
        import torch.distributed.checkpoint as dcp  # 0.5 s of imports: paid at the first save, not at start-up

        with single_process_dcp():
            dcp.save(state, checkpoint_id=staging / "model_optim")

    def _staging(self, wrapped: nn.Module) -> Any:
        """DCP's default stager (a blocking copy to CPU memory), but one for the whole run: it keeps the
        copy's buffers (keyed by each tensor's storage, which the optimizer updates in place), so a save
        after the first copies into memory already mapped instead of faulting in 300 MB anew (0.04 s
        instead of 0.04-0.6 s for model=small, bench/checkpoint_async.py). It holds one more copy of the
        state in CPU memory for the run (pinned on CUDA, where the copy is from the GPU)."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            pinned = next(wrapped.parameters()).is_cuda  # pinned memory: a faster copy from the GPU
            self._stager = DefaultStager(StagingOptions(pinned, False, False, False))
        return self._stager

    def _background(self) -> ThreadPoolExecutor:
        if self._checksums is None:
            self._checksums = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmtrain-checksums")
        return self._checksums

    def _complete(self, step: int, staging: Path, final: Path, trainer_state: dict[str, Any], digests: Any = None) -> None:
        """Every rank's files are written: rank 0 adds the manifest, renames the folder, prunes.
        ``digests``: the checksums of the files so far, when computed in the background."""
        self.env.barrier()
        if not self.env.is_main:
            return
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        files = dict(digests) if isinstance(digests, dict) else {}
        files |= {
            str(p.relative_to(staging)): sha256(p) for p in files_under(staging) if str(p.relative_to(staging)) not in files
        }
        manifest = {
            "step": step,
            "world_size": self.env.world_size,
            **self.identity,
            "val_loss": trainer_state.get("val_loss"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            log.warning("replacing %s, left by an earlier attempt past the step this run resumed from", final)
            shutil.rmtree(final)
        os.rename(staging, final)
        self._update_best(final, trainer_state.get("val_loss"))
        self._prune()

    def _failed(self, staging: Path, final: Path, state: dict[str, Any], error: BaseException) -> NoReturn:
        shutil.rmtree(staging, ignore_errors=True)  # a partial save must not keep the disk full
        if (full := self._disk_full(final, state, error)) is not None:
            raise CheckpointError(full) from error
        raise error

    def _disk_full(self, final: Path, state: dict[str, Any], error: BaseException) -> str | None:
        """The message for a save that failed for want of space (None: it failed for another reason).

        DCP does not always say ENOSPC (a short write shows as "unexpected pos"): the free space after
        the partial save is removed is compared with what a checkpoint takes (the newest one's size,
        or the state's bytes)."""
        free = shutil.disk_usage(self.root).free
        newest = list_checkpoints(self.root)
        if newest:
            needed = sum(f.stat().st_size for f in newest[0][1].rglob("*") if f.is_file())
        else:
            needed = sum(t.numel() * t.element_size() for t in _tensors(state))
        chain = [error, *([error.__cause__] if error.__cause__ else []), *getattr(error, "failures", {}).values()]
        enospc = any(getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) for e in chain)
        if not enospc and free >= needed:
            return None
        mb = 1024 * 1024
        return (
            f"no space left on device while writing checkpoint step {int(final.name[5:])} to {final}: about "
            f"{needed / mb:.0f} MB needed, {free / mb:.0f} MB free (the partial save was removed; the run resumes "
            "from its newest checkpoint once there is room)"
        )

    def choose(self, resume: str) -> Path | None:
        """The checkpoint to resume from: rank 0 decides, every rank gets the same answer (or the same
        ConfigError: ``trainer.resume`` names a checkpoint that fails its checks, or every checkpoint
        of the run is invalid, which would otherwise start over at step 0 and overwrite them)."""
        choice: list[Any] = [None, None]  # the checkpoint; why none can be used (key, value, expected)
        if self.env.is_main:
            if resume == "auto":
                found = newest_valid(self.root)
                choice[0] = str(found) if found else None
                if found is None and (reasons := invalid_checkpoints(self.root)):
                    choice[1] = ("trainer.resume", "auto", every_checkpoint_invalid(reasons))
            elif resume != "never":
                try:
                    verify(Path(resume))
                    choice[0] = resume
                except CheckpointError as e:
                    choice[1] = ("trainer.resume", resume, str(e))
        if self.env.distributed:
            dist.broadcast_object_list(choice, src=0)
        if choice[1]:
            raise ConfigError(*choice[1])
        return Path(choice[0]) if choice[0] else None

    def load(self, path: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from ``path``; return the trainer state."""
        import torch.distributed.checkpoint as dcp

        state = self.strategy.state_dict(wrapped, optimizer)
        with single_process_dcp():
            dcp.load(state, checkpoint_id=path / "model_optim")
        self.strategy.load_state_dict(wrapped, optimizer, state)
        rng_file = path / "rng" / f"rank{self.env.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("%s has no RNG state for rank %d (saved with another world size); RNG is reseeded", path, self.env.rank)
        return json.loads((path / "trainer_state.json").read_text())

    def _update_best(self, path: Path, val_loss: float | None) -> None:
        if val_loss is None:
            return
        best = read_best(self.root)
        if best is None or val_loss < best["val_loss"] or not (self.root / best["name"]).is_dir():
            best = {"name": path.name, "step": int(path.name[5:]), "val_loss": val_loss}
            (self.root / BEST).write_text(json.dumps(best, indent=1))

    def _prune(self) -> None:
        best = (read_best(self.root) or {}).get("name") if self.keep_best else None
        for index, (_, path) in enumerate(list_checkpoints(self.root)):
            if index >= self.keep_last and path.name != best:
                shutil.rmtree(path, ignore_errors=True)
