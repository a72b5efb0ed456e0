"""Tensor parallel: each block's projections split over the ranks, Megatron-style.

The plan comes from the model's spec (``ModelSpec.tp_plan``; Llama's): column-parallel Q/K/V and SwiGLU inputs,
row-parallel output projections, so each block needs one all-reduce forward and one backward.
Every rank sees the same data; embeddings, norms and the head stay replicated. With
``strategy.sequence_parallel=true`` the norms and the residual stream are split along the sequence
between the projections (``ModelSpec.sequence_parallel_plan``): each all-reduce becomes a
reduce-scatter and an all-gather, and activations outside attention and the feed-forward take 1/tp.
"""

from __future__ import annotations

import torch
from torch import nn

from fmtrain.models.spec import Recipe
from fmtrain.strategies.base import Strategy, assign_full, initialize, prepare_blocks, sharded_grad_scaler


def apply_tensor_parallel(recipe: Recipe, model: nn.Module, tp_mesh, *, sequence_parallel: bool = False) -> None:
    import inspect

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        ParallelStyle,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    def style(path: str, name: str) -> ParallelStyle:
        if name == "colwise":
            return ColwiseParallel()
        if name == "rowwise":
            return RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate())
        if name == "norm":
            return SequenceParallel()
        # "split" / "gather": the first input (activations) changes layout, the others (rope) do not.
        # Inputs with defaults (a packed batch's mask) are not passed without packing: not counted.
        parameters = inspect.signature(model.get_submodule(path).forward).parameters.values()
        others = (None,) * (sum(p.default is inspect.Parameter.empty for p in parameters) - 1)
        if name == "split":
            return PrepareModuleInput(
                input_layouts=(Replicate(), *others), desired_input_layouts=(Shard(1), *others), use_local_output=True
            )
        return PrepareModuleInput(
            input_layouts=(Shard(1), *others), desired_input_layouts=(Replicate(), *others), use_local_output=True
        )

    plan = recipe.spec.tp_plan(model)
    if plan is None:  # validation refuses this before launch
        raise ValueError(f"model.arch={recipe.spec.name} has no tensor-parallel plan")
    if sequence_parallel:
        plan = plan | (recipe.spec.sequence_parallel_plan(model) or {})
    parallelize_module(model, tp_mesh, {path: style(path, name) for path, name in plan.items()})


class TPStrategy(Strategy):
    needs_process_group = True

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return sharded_grad_scaler(self)

    def build(self, recipe: Recipe, seed: int | None) -> nn.Module:
        mesh = self.dims.build_mesh(self.device.type)["tp"]
        model = recipe.meta()
        apply_tensor_parallel(recipe, model, mesh, sequence_parallel=self.cfg.sequence_parallel)
        prepare_blocks(recipe.blocks(model), self.trainer)
        model.to_empty(device=self.device)
        initialize(recipe, model, seed, assign_full)
        return model
