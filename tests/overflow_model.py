"""Llama with weights of 1e30 (``model.arch=llama_overflow``): its gradients overflow on the first
step, deterministically. ``model.init_std`` refuses such a value, as a user's mistake; a test that
needs the overflow registers this instead (``imports=[overflow_model]``, ``tests/`` on PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fmtrain import models
from fmtrain.models.llama import LlamaSpec
from fmtrain.models.spec import Assign, copy_value


class OverflowSpec(LlamaSpec):
    name = "llama_overflow"

    def init_weights(
        self,
        model: nn.Module,
        seed: int,
        assign: Assign = copy_value,
        parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    ) -> None:
        def huge(param: torch.Tensor, value: torch.Tensor) -> None:
            assign(param, value if value.eq(1).all() else value * 5e31)  # norms stay 1; 0.02 x 5e31 = 1e30

        super().init_weights(model, seed, huge, parameters)


models.register(OverflowSpec())
