"""2-D parallelism: tensor parallel inside groups of ``strategy.tp`` ranks, FSDP2 across the groups.

Tensor parallelism is applied first (its DTensors live on the "tp" mesh dimension), then FSDP shards
them again over "dp", torchtitan's order. Everything else is FSDP's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fmtrain.models.spec import Recipe
from fmtrain.strategies.fsdp import FSDPStrategy
from fmtrain.strategies.tp import apply_tensor_parallel

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class FSDPTPStrategy(FSDPStrategy):
    def apply_tensor_parallel(self, recipe: Recipe, model: nn.Module, mesh: DeviceMesh) -> None:
        apply_tensor_parallel(recipe, model, mesh["tp"], sequence_parallel=self.cfg.sequence_parallel)
