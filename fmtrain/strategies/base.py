"""The strategy contract, and the parts every strategy shares (plain, replicated training).

Each strategy is a file beside this one with a subclass of :class:`Strategy`; ``fmtrain.strategies``
names them (:func:`fmtrain.strategies.make_strategy`). Here: the contract, precision helpers (the
compute dtype, fp16 loss scaling for sharded gradients), activation checkpointing and compile of a
model's blocks, and how a seeded full tensor is copied into a parameter's shard.

A strategy knows models only through their :class:`~fmtrain.models.spec.ModelSpec` (held by the
:class:`~fmtrain.models.spec.Recipe` it builds): it never imports a model class.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmtrain import hardware
from fmtrain.compat.torch import local_tensor_grad_scaler
from fmtrain.config import StrategyConfig, TrainerConfig
from fmtrain.distributed import DistEnv
from fmtrain.models.spec import Assign, Recipe, copy_value
from fmtrain.parallel import ParallelDims

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype ops run in: fp8 runs its linear layers in float8 and everything else in bf16."""
    return DTYPES["bf16" if precision == "fp8" else precision]


def assign_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole (unsharded) value into a parameter, keeping only the shard a DTensor holds.

    Every rank draws the same full value from the seed, so no communication is needed.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def initialize(recipe: Recipe, model: nn.Module, seed: int | None, assign: Assign = copy_value) -> None:
    """The weights drawn from ``seed``; with None, only what loading a state dict does not set
    (buffers, tied weights): drawing weights that are overwritten next would only cost time."""
    if seed is None:
        recipe.spec.init_buffers(model)
    else:
        recipe.spec.init_weights(model, seed, assign)


def prepare_blocks(blocks: Sequence[nn.Module], cfg: TrainerConfig) -> None:
    """Activation checkpointing and torch.compile per block: after TP, before FSDP (torchtitan's order).

    (Converters such as fp8's come before all of these: :meth:`Recipe.build` applies them on the
    meta device.)
    """
    if cfg.activation_checkpointing != "none":
        every = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every_n
        for index in range(0, len(blocks), every):
            checkpoint_block(blocks[index])
    if cfg.compile == "true":  # "auto" is resolved before a strategy is made (fmtrain.step.resolve_compile)
        for block in blocks:
            block.compile()


def checkpoint_block(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward instead of keeping them (while grad is enabled).

    The block's own ``forward`` is wrapped, not the module: parameter names stay as they are (a
    wrapper module would add a prefix to every name in checkpoints), and hooks a strategy puts on
    the block (FSDP's all-gather) run outside the recomputed region, as with torchtitan's wrapper.
    """
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed  # type: ignore[method-assign]
    block.checkpointed = True  # type: ignore[assignment]


def checkpointed_blocks(blocks: Sequence[nn.Module]) -> set[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    return {index for index, block in enumerate(blocks) if getattr(block, "checkpointed", False)}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharded_grad_scaler(strategy: Strategy) -> torch.amp.GradScaler | None:
    """fp16 loss scaling for gradients that differ between ranks (shards): the overflow flag is
    all-reduced, so every rank skips the same steps (:func:`fmtrain.compat.torch.local_tensor_grad_scaler`)."""
    return local_tensor_grad_scaler(strategy.device.type) if strategy.precision == "fp16" else None


@dataclass
class StepStats:
    """What one optimizer step did, as every strategy reports it."""

    grad_norm: float  # the global norm before clipping (nan where it could not be computed)
    applied: bool  # the parameters were updated
    overflow: bool  # fp16 loss scaling found inf/nan gradients and skipped (expected now and then)
    state_bytes: int  # parameters + gradients + optimizer state this rank holds, measured while gradients exist
    optim_state_bytes: int  # the optimizer state alone


class Strategy:
    """The contract, with the parts every strategy shares (plain, replicated training).

    Per step the trainer calls, on every rank: ``backward(loss)`` for each micro-batch (inside
    ``no_sync`` but for the last), then ``optimizer_step`` once, which unscales, clips and steps, or
    skips, and zeroes the gradients. fp16 loss scaling is the strategy's (its own scaler, or its
    engine's) and so is the scaler's state in checkpoints (:meth:`scaler_state`).
    """

    needs_process_group = False  # True where a device mesh is built even for one process

    def __init__(self, cfg: StrategyConfig, precision: str, trainer: TrainerConfig, env: DistEnv, device: torch.device) -> None:
        self.cfg, self.precision, self.trainer, self.env, self.device = cfg, precision, trainer, env, device
        self.dims = ParallelDims.from_config(cfg, env.world_size)
        hardware.check(device.type, cfg.name, precision, device.index or 0)  # this rank's own: a node may differ
        self.scaler: torch.amp.GradScaler | None = None  # set with the optimizer (attach_optimizer)

    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this rank trains on."""
        return self.dims.dp_rank(self.env.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def build(self, recipe: Recipe, seed: int | None) -> nn.Module:
        """Build the recipe's model on the meta device, parallelize it, materialize it on this rank,
        initialize it from ``seed`` (None: every weight is loaded next, so only buffers and ties are
        set), wrap it.

        Returns the model to train: the model itself, or a wrapper that holds it as ``.module`` (DDP).
        """
        model = recipe.meta()
        prepare_blocks(recipe.blocks(model), self.trainer)
        model.to_empty(device=self.device)
        initialize(recipe, model, seed)
        return self.wrap(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def attach_optimizer(
        self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, *, micro: int, accum: int, grad_clip: float
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Hand the optimizer to the strategy, where an engine wraps model and optimizer together."""
        self.scaler = self.grad_scaler()
        return wrapped, optimizer

    def files(self) -> dict[str, str]:
        """Files for the run directory that describe how this strategy runs (name -> text)."""
        return {}

    def backward(self, wrapped: nn.Module, loss: torch.Tensor, *, boundary: bool) -> None:
        """Backward of one micro-batch's loss (already divided by the accumulation steps), scaled for
        fp16; ``boundary``: the last micro-batch of the accumulation (gradients sync)."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(
        self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, *, loss_finite: bool
    ) -> StepStats:
        """Unscale (fp16), clip to ``grad_clip`` (0: only measure), then step; zero the gradients.

        No update where ``loss_finite`` is False (some rank's loss was inf/nan) or the gradient norm
        is not finite: an fp16 overflow is the scaler's to skip (``overflow``, the scale lowered);
        anything else is the trainer's to report (``applied`` False).
        """
        if self.scaler:
            self.scaler.unscale_(optimizer)
        grad_norm = float(self.clip_grad_norm(wrapped, grad_clip))
        overflow = applied = False
        if self.scaler and loss_finite and not math.isfinite(grad_norm):
            self.scaler.step(optimizer)  # finds the inf/nan and skips
            overflow = True
        elif loss_finite and math.isfinite(grad_norm):
            self.scaler.step(optimizer) if self.scaler else optimizer.step()
            applied = True
        if self.scaler:
            self.scaler.update()
        stats = StepStats(
            grad_norm, applied, overflow, self.state_bytes(wrapped, optimizer), self.optimizer_state_bytes(optimizer)
        )
        optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so that the step's wall time is the step's work
        return stats

    def scaler_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The fp16 loss scaler's state for the checkpoint (``{}`` without one), under its own key."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_scaler_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.scaler and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def loss_scale(self, optimizer: torch.optim.Optimizer) -> float | None:
        """The current fp16 loss scale (None without loss scaling)."""
        return self.scaler.get_scale() if self.scaler else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass, where the strategy does not cast parameters itself."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=compute_dtype(self.precision))

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module) -> Iterator[None]:
        """Skip gradient synchronisation (micro-steps before the last of an accumulation)."""
        yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """Dynamic loss scaling for fp16, so that small gradients do not underflow; else None.

        Replicated gradients agree on every rank, so the plain scaler's overflow check does too.
        """
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def clip_grad_norm(self, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip gradients to ``max_norm`` (0 = only measure) and return the global norm.

        Sharded gradients (DTensors, grouped by mesh) contribute the norm of their whole tensor;
        replicated ones count once.
        """
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
        groups: dict[Any, list[torch.Tensor]] = {}
        for grad in grads:
            groups.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(grad)
        norms = []
        for group in groups.values():
            norm = torch.nn.utils.get_total_norm(group)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if max_norm > 0:
            coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
            for grad in grads:
                grad.mul_(coef)
        return total

    def state_bytes(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of parameters, gradients and optimizer state that this rank actually holds."""
        tensors = {id(p): _local(p) for p in wrapped.parameters()}
        tensors |= {id(p.grad): _local(p.grad) for p in wrapped.parameters() if p.grad is not None}
        for state in optimizer.state.values():
            tensors |= {id(v): _local(v) for v in state.values() if isinstance(v, torch.Tensor)}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def optimizer_state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of optimizer state (AdamW moments) that this rank holds: what ZeRO-1 partitions."""
        tensors = [_local(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(wrapped, optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        # A group's saved hyper-parameters replace this optimizer's, its kernel choice among them; a
        # run saved with the fused kernel must not impose it where this strategy cannot use it (tp).
        kernel = {k: optimizer.param_groups[0][k] for k in ("fused", "foreach") if k in optimizer.param_groups[0]}
        for group in state["optim"].get("param_groups", []):
            group.update(kernel)
        set_state_dict(wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
