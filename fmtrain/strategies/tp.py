"""Tensor parallel: each block's projections split over the ranks, Megatron-style.

The plan comes from the model (``Transformer.tp_plan``): column-parallel Q/K/V and SwiGLU inputs,
row-parallel output projections, so each block needs one all-reduce forward and one backward.
Every rank sees the same data; embeddings, norms and the head stay replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from fmtrain.model import Transformer
from fmtrain.strategies import Strategy, assign_full, prepare_blocks, sharded_grad_scaler


def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, tp_mesh, {path: styles[style]() for path, style in model.tp_plan().items()})


class TPStrategy(Strategy):
    needs_process_group = True

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return sharded_grad_scaler(self)

    def build(self, model: Transformer, seed: int) -> nn.Module:
        apply_tensor_parallel(model, self.dims.build_mesh(self.device.type)["tp"])
        prepare_blocks(model, self.trainer)
        model.to_empty(device=self.device)
        model.init_weights(seed, assign=assign_full)
        return model
