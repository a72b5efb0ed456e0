"""FSDP2: every parameter, gradient and optimizer state sharded over the data-parallel ranks.

``fully_shard`` is applied to each transformer block (its parameters are gathered just before the
block runs and freed after, ``strategy.reshard_after_forward``) and then to the root, on the meta
device; each rank then materializes only its shard. bf16 is FSDP's mixed-precision policy: bf16
parameters in compute, fp32 gradient reduction and fp32 master state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fmtrain.models.spec import Recipe
from fmtrain.strategies.base import Strategy, assign_full, compute_dtype, initialize, prepare_blocks, sharded_grad_scaler

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def fully_shard_model(
    model: nn.Module, blocks: Sequence[nn.Module], mesh, *, reshard_after_forward: bool, precision: str, cpu_offload: bool
) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mixed = (
        MixedPrecisionPolicy(param_dtype=compute_dtype(precision), reduce_dtype=torch.float32)
        if precision != "fp32"
        else MixedPrecisionPolicy()
    )
    options = {
        "mesh": mesh,
        "mp_policy": mixed,
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    # The root's parameters (embeddings, final norm, head) are used last in forward and first in
    # backward: keeping them gathered saves one all-gather per step.
    fully_shard(model, reshard_after_forward=False, **options)


class FSDPStrategy(Strategy):
    needs_process_group = True

    def build(self, recipe: Recipe, seed: int | None) -> nn.Module:
        mesh = self.dims.build_mesh(self.device.type)
        model = recipe.meta()
        self.apply_tensor_parallel(recipe, model, mesh)
        blocks = recipe.blocks(model)
        prepare_blocks(blocks, self.trainer)
        fully_shard_model(
            model,
            blocks,
            mesh["dp"],
            reshard_after_forward=self.cfg.reshard_after_forward,
            precision=self.precision,
            cpu_offload=self.cfg.cpu_offload,
        )
        model.to_empty(device="cpu" if self.cfg.cpu_offload else self.device)
        initialize(recipe, model, seed, assign_full)
        return model

    def apply_tensor_parallel(self, recipe: Recipe, model: nn.Module, mesh: DeviceMesh) -> None:
        """Split layers over the mesh's "tp" dimension before sharding (fsdp_tp); plain FSDP does not."""

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return sharded_grad_scaler(self)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters itself

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module) -> Iterator[None]:
        wrapped.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)  # type: ignore[operator]
