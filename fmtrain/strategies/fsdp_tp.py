"""2-D parallelism: tensor parallel inside groups of ``strategy.tp`` ranks, FSDP2 across the groups.

Tensor parallelism is applied first (its DTensors live on the "tp" mesh dimension), then FSDP shards
them again over "dp", torchtitan's order.
"""

from __future__ import annotations

from torch import nn

from fmtrain.model import Transformer
from fmtrain.strategies import assign_full, prepare_blocks
from fmtrain.strategies.fsdp import FSDPStrategy, fully_shard_model
from fmtrain.strategies.tp import apply_tensor_parallel


class FSDPTPStrategy(FSDPStrategy):
    def build(self, model: Transformer, seed: int) -> nn.Module:
        mesh = self.dims.build_mesh(self.device.type)
        apply_tensor_parallel(model, mesh["tp"])
        prepare_blocks(model, self.trainer)
        fully_shard_model(
            model,
            mesh["dp"],
            reshard_after_forward=self.cfg.reshard_after_forward,
            precision=self.precision,
            cpu_offload=self.cfg.cpu_offload,
        )
        model.to_empty(device="cpu" if self.cfg.cpu_offload else self.device)
        model.init_weights(seed, assign=assign_full)
        return model
