"""submitit internals fmtrain relies on: its sbatch renderer (so ``--dry-run`` prints exactly the
script submitit submits), its memory formatting, and the module a job runs.

Checked by ``tests/test_compat.py``: the renderer accepts every parameter fmtrain passes, and
memory renders as sbatch expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SUBMIT_MODULE = "submitit.core._submit"  # what each Slurm task runs: unpickles and calls the job


def make_sbatch_string(command: str, folder: Path, setup: list[str], map_count: int | None, **params: Any) -> str:
    """The sbatch script submitit's SlurmExecutor would submit with these parameters."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, setup=setup, map_count=map_count, **params)


def convert_mem(gb: float) -> str:
    """Memory in submitit's (and sbatch's) notation: 16 -> "16GB", 2.5 -> "2560MB"."""
    from submitit.slurm.slurm import _convert_mem

    return _convert_mem(gb)
