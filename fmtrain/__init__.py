"""fmtrain: train foundation models with one command, on a laptop, a Slurm cluster or Ray.

``fmtrain.run(cfg)`` is the training library call that every launcher makes in every process.
Heavy modules load on first use: ``import fmtrain`` imports neither torch nor any launcher backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fmtrain.trainer import RunResult, run


def __getattr__(name: str) -> Any:
    if name in ("run", "RunResult"):
        from fmtrain import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fmtrain' has no attribute {name!r}")


__all__ = ["RunResult", "run"]
