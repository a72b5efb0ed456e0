"""Strategies: how a model is built, wrapped and stepped across ranks, one file per strategy.

    strategy = make_strategy(cfg.strategy, cfg.precision.name, env, device)
    trained = strategy.build(recipe, seed)            # build on meta, parallelize, materialize, initialize
    with strategy.autocast():
        loss = loss_fn(trained(inputs))

A strategy turns a plain model (built on the meta device) into something that steps, and knows how
to produce and load a state dict in ``torch.distributed.checkpoint``'s format: fully qualified names
and DTensor shards, so a checkpoint saved under one strategy and world size loads under another.
Adding a strategy adds a file and a line in ``make_strategy``; nothing else branches on its name.
"""

from __future__ import annotations

import torch

from fmtrain.config import StrategyConfig, TrainerConfig
from fmtrain.distributed import DistEnv
from fmtrain.strategies.base import (
    DTYPES,
    StepStats,
    Strategy,
    assign_full,
    checkpoint_block,
    checkpointed_blocks,
    compute_dtype,
    prepare_blocks,
    sharded_grad_scaler,
)

__all__ = [
    "DTYPES",
    "StepStats",
    "Strategy",
    "assign_full",
    "checkpoint_block",
    "checkpointed_blocks",
    "compute_dtype",
    "make_strategy",
    "prepare_blocks",
    "sharded_grad_scaler",
]


def make_strategy(cfg: StrategyConfig, precision: str, trainer: TrainerConfig, env: DistEnv, device: torch.device) -> Strategy:
    from fmtrain.strategies.ddp import DDPStrategy
    from fmtrain.strategies.fsdp import FSDPStrategy
    from fmtrain.strategies.fsdp_tp import FSDPTPStrategy
    from fmtrain.strategies.tp import TPStrategy
    from fmtrain.strategies.zero import DeepSpeedStrategy

    strategies: dict[str, type[Strategy]] = {
        "ddp": DDPStrategy,
        "fsdp": FSDPStrategy,
        "deepspeed": DeepSpeedStrategy,
        "tp": TPStrategy,
        "fsdp_tp": FSDPTPStrategy,
    }
    return strategies[cfg.name](cfg, precision, trainer, env, device)
