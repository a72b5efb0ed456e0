"""AdamW with weight decay on matrices only, and the learning-rate schedule as a pure function.

The schedule is a function of the step alone, so a resumed run needs no scheduler state to get the
same learning rate as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fmtrain.config import OptimConfig


def decays(param: torch.Tensor) -> bool:
    """Whether weight decay applies: to matrices, by the parameter's own shape (ZeRO-3 keeps a
    partitioned parameter as a flat local tensor and its shape in ``ds_shape``)."""
    return len(getattr(param, "ds_shape", param.shape)) >= 2


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; matrices (embeddings and projections) decay, vectors (norm gains) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if decays(p)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
    ]
    fused: bool | None = cfg.implementation == "fused"
    foreach: bool | None = cfg.implementation == "foreach"
    if len({type(p) for p in params}) > 1:
        # DTensors beside plain tensors (tensor parallel's split matrices, its replicated norm gains):
        # the fused and foreach kernels take one kind per call, so torch's default picks the kernel.
        fused = foreach = None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=fused, foreach=foreach)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to ``lr``, then cosine/linear decay to ``lr * min_lr_ratio`` (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * shape
