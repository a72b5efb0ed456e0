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
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fmtrain.distributed import DistEnv
from fmtrain.strategies import Strategy

log = logging.getLogger("fmtrain")

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
BEST = "best.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, named with the reason."""


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """DCP warns when no process group exists; for one process that is the intended use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify(path: Path) -> dict[str, Any]:
    """Return the manifest of a complete, uncorrupted checkpoint, or raise CheckpointError."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete save)")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected: dict[str, str] = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from e
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} fails its sha256 checksum")
    return manifest


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders under ``root`` as (step, path), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def newest_valid(root: Path) -> Path | None:
    for _, path in list_checkpoints(root):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint %s", e)
    return None


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


class Checkpointer:
    """Saves and restores the whole training state of one run under ``root``."""

    def __init__(
        self, root: Path, env: DistEnv, strategy: Strategy, *, keep_last: int, keep_best: bool, identity: dict[str, Any]
    ) -> None:
        self.root, self.env, self.strategy = root, env, strategy
        self.keep_last, self.keep_best = keep_last, keep_best
        self.identity = identity  # strategy, config hash: written into every manifest

    def save(self, step: int, wrapped: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]) -> Path:
        final = self.root / step_dir_name(step)
        staging = self.root / f".{final.name}.tmp"
        if self.env.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.env.barrier()
        started = time.perf_counter()
        import torch.distributed.checkpoint as dcp  # 0.5 s of imports: paid at the first save, not at start-up

        with single_process_dcp():
            dcp.save(self.strategy.state_dict(wrapped, optimizer), checkpoint_id=staging / "model_optim")
        (staging / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), staging / "rng" / f"rank{self.env.rank}.pt")
        self.env.barrier()
        if self.env.is_main:
            (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            manifest = {
                "step": step,
                "world_size": self.env.world_size,
                **self.identity,
                "val_loss": trainer_state.get("val_loss"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": {str(p.relative_to(staging)): sha256(p) for p in _files_under(staging)},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():
                log.warning("replacing %s, left by an earlier attempt past the step this run resumed from", final)
                shutil.rmtree(final)
            os.rename(staging, final)
            self._update_best(final, trainer_state.get("val_loss"))
            self._prune()
            log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - started)
        self.env.barrier()
        return final

    def choose(self, resume: str) -> Path | None:
        """The checkpoint to resume from: rank 0 decides, every rank gets the same answer."""
        choice: list[str | None] = [None]
        if self.env.is_main:
            if resume == "never":
                choice[0] = None
            elif resume == "auto":
                found = newest_valid(self.root)
                choice[0] = str(found) if found else None
            else:
                verify(Path(resume))
                choice[0] = resume
        if self.env.distributed:
            dist.broadcast_object_list(choice, src=0)
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
        best_file = self.root / BEST
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        if best is None or val_loss < best["val_loss"] or not (self.root / best["name"]).is_dir():
            best_file.write_text(json.dumps({"name": path.name, "step": int(path.name[5:]), "val_loss": val_loss}, indent=1))

    def _prune(self) -> None:
        best_file = self.root / BEST
        best = json.loads(best_file.read_text())["name"] if self.keep_best and best_file.is_file() else None
        for index, (_, path) in enumerate(list_checkpoints(self.root)):
            if index >= self.keep_last and path.name != best:
                shutil.rmtree(path, ignore_errors=True)
