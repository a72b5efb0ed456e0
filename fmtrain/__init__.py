"""fmtrain: train foundation models with one command, on a laptop, a Slurm cluster or Ray.

``fmtrain.run(cfg)`` is the training library call that every launcher makes in every process.
Heavy modules load on first use: ``import fmtrain`` imports neither torch nor any launcher backend.

Layers, lowest first; a module imports only its own layer or lower ones (``tests/test_layering.py``
holds the exact table and checks it, imports inside functions included):

1. ``config``: the schema (``config.schema``, each field with its domain: ``config.domains``) and its
   boundaries (``config.io``); nothing else of fmtrain.
2. ``distributed``, ``hardware``, ``parallel``, ``signals``, ``models.spec`` (the model contract);
   ``manifests`` (a run's checkpoint files, without torch);
   ``models.llama_hf`` (Hugging Face's Llama layout); the models (``models.llama``) and converters
   (``models.converters``: fp8); ``models`` (the registry); then
   ``workpool`` and ``tokenizer`` (tokenizing in worker processes, without torch), ``sources`` (where
   text comes from), ``examples`` (fine-tuning records); ``optim``, ``metrics``, ``data`` (the cached
   shards and their samplers), ``losses`` (batches are dicts; a loss maps logits and a batch to a mean).
3. ``validation`` (what combinations can run) and ``strategies.base`` (the strategy contract); the
   strategies, one file each; ``strategies`` (the registry) and ``plan``.
4. ``checkpoint`` and ``step`` (one optimizer step, evaluation); ``trainer`` (the loop) and
   ``export``; ``worker`` (a launched rank: the training run, or any entry point as a process).
5. ``launch``: ``spec`` (a run, its entry point, its handle)/``compose``/``env``; the launchers
   (``local``, ``slurm`` with ``slurm_task``, ``ray``), their registry ``launchers``; ``tune`` (its
   ``space``, ``trials`` and ``results``); one module per verb in ``launch.commands``; ``cli`` on
   top, which only dispatches.
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
