"""The files of a run's checkpoints, without torch: which exist, which are complete and intact
(``manifest.json`` and its checksums), and ``best.json``. Cheap enough for the CLI to check a run
directory before anything starts.

    newest_valid(run_dir / "checkpoints")     # the newest intact checkpoint, or None (each skipped one warned)
    verify(path)                              # its manifest, or CheckpointError naming what is wrong
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("fmtrain")

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
BEST = "best.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, named with the reason."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_under(root: Path) -> list[Path]:
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


def invalid_checkpoints(root: Path) -> list[str]:
    """Why each checkpoint under ``root`` cannot be used, when none can; [] if one can (or none exist)."""
    reasons = []
    for _, path in list_checkpoints(root):
        try:
            verify(path)
            return []
        except CheckpointError as e:
            reasons.append(str(e))
    return reasons


def writable_problem(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (or, while it does not exist, in the nearest folder
    above it, where it would be made), or None. A real write, not a permission check: a read-only
    mount refuses root too."""
    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        return f"{target} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".fmtrain-write-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in {target}: {e.strerror or e}"
    return None


def run_dir_problem(run_dir: Path) -> str | None:
    """Why a run cannot write its directory or its checkpoints folder (a mount of its own), or None."""
    for folder in (run_dir, run_dir / "checkpoints"):
        if (folder.exists() or folder == run_dir) and (problem := writable_problem(folder)) is not None:
            return problem
    return None


def every_checkpoint_invalid(reasons: list[str]) -> str:
    """What to say when no checkpoint of a run can be used (starting over would overwrite them)."""
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    return (
        f"every checkpoint of this run is invalid ({shown}): remove or repair them, or set trainer.resume=never "
        "to start over from step 0 (it overwrites them)"
    )


def read_best(root: Path) -> dict[str, Any] | None:
    """``best.json`` (name, step, val_loss of the best checkpoint), or None if absent or unreadable
    (a garbage file is warned about and then rewritten at the next save)."""
    path = root / BEST
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        if isinstance(best, dict) and isinstance(best.get("name"), str) and isinstance(best.get("val_loss"), int | float):
            return best
        raise ValueError("not {name, step, val_loss}")
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: unreadable (%s); it is written anew at the next save", path, e)
        return None
