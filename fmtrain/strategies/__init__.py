"""Strategies: how a model is wrapped for training across ranks, one file per strategy.

A strategy turns a plain model into something that steps, and knows how to produce and load a
state dict in ``torch.distributed.checkpoint``'s format (fully qualified names, so a checkpoint
saved under one strategy and world size loads under another). Adding a strategy adds a file and a
line in ``STRATEGIES``; nothing else in the tree branches on the strategy's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fmtrain.config import StrategyConfig
from fmtrain.distributed import DistEnv


class Strategy:
    """The contract, with the parts every strategy shares."""

    def __init__(self, cfg: StrategyConfig, env: DistEnv, device: torch.device) -> None:
        self.cfg, self.env, self.device = cfg, env, device

    def wrap(self, model: nn.Module) -> nn.Module:
        """Return the module to train (forward + backward); ``model`` stays the plain module."""
        raise NotImplementedError

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module) -> Iterator[None]:
        """Skip gradient synchronisation (micro-steps before the last of an accumulation)."""
        yield

    def clip_grad_norm(self, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip gradients to ``max_norm`` (0 = only measure) and return the global norm."""
        params = [p for p in wrapped.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(wrapped, optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def make_strategy(cfg: StrategyConfig, env: DistEnv, device: torch.device) -> Strategy:
    from fmtrain.strategies.ddp import DDPStrategy

    strategies: dict[str, type[Strategy]] = {"ddp": DDPStrategy}
    return strategies[cfg.name](cfg, env, device)
