"""The strategy contract, and the parts every strategy shares (plain, replicated training).

Each strategy is a file beside this one with a subclass of :class:`Strategy`; ``fmtrain.strategies``
names them (:func:`fmtrain.strategies.make_strategy`). Here: the contract, precision helpers (the
compute dtype, fp8's conversion, fp16 loss scaling for sharded gradients), and how a seeded full
tensor is copied into a parameter's shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fmtrain import hardware
from fmtrain.config import StrategyConfig, TrainerConfig
from fmtrain.distributed import DistEnv
from fmtrain.model import Transformer
from fmtrain.parallel import ParallelDims

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype ops run in: fp8 runs its linear layers in float8 and everything else in bf16."""
    return DTYPES["bf16" if precision == "fp8" else precision]


def convert_to_fp8(model: Transformer) -> None:
    """Swap the blocks' linear layers for torchao's Float8Linear (dynamic tensorwise scaling).

    The output head stays in bf16 (its logits feed the loss; torchtitan does the same), and so does
    any layer whose sizes are not multiples of 16 (fp8 matmuls need them). Apply before tensor
    parallelism and FSDP, on the meta device.
    """
    from torchao.float8 import convert_to_float8_training

    def eligible(module: nn.Module, fqn: str) -> bool:
        return (
            isinstance(module, nn.Linear)
            and fqn.startswith("blocks.")
            and not module.in_features % 16
            and not module.out_features % 16
        )

    convert_to_float8_training(model, module_filter_fn=eligible)


def assign_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole (unsharded) value into a parameter, keeping only the shard a DTensor holds.

    Every rank draws the same full value from the seed, so no communication is needed.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def prepare_blocks(model: Transformer, cfg: TrainerConfig) -> None:
    """Activation checkpointing and torch.compile per block: after TP, before FSDP (torchtitan's order).

    (fp8's conversion of linear layers comes before all of these: :meth:`Strategy.__init__` checks
    the device (:func:`fmtrain.hardware.check`), ``build`` converts on the meta device.)
    """
    if cfg.activation_checkpointing != "none":
        every = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every_n
        model.checkpointed = frozenset(range(0, len(model.blocks), every))
    if cfg.compile:
        for block in model.blocks:
            block.compile()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharded_grad_scaler(strategy: Strategy) -> torch.amp.GradScaler | None:
    """fp16 loss scaling for gradients that differ between ranks (shards): the overflow flag is
    all-reduced, so every rank skips the same steps. Gradients may be DTensors and plain tensors
    side by side (tensor parallel's split projections beside its replicated embeddings and norms):
    each is unscaled through its local tensor, which torch's one-list unscale kernel accepts."""
    from types import SimpleNamespace

    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    from torch.distributed.tensor import DTensor

    class LocalTensorGradScaler(ShardedGradScaler):
        def _unscale_grads_(self, optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool = True) -> Any:
            grads = [
                SimpleNamespace(grad=p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
                for group in optimizer.param_groups
                for p in group["params"]
            ]
            local = SimpleNamespace(param_groups=[{"params": grads}])
            return super()._unscale_grads_(local, inv_scale, found_inf, allow_fp16)  # type: ignore[arg-type]

        def unscale_(self, optimizer: Any) -> None:
            super().unscale_(optimizer)
            # ShardedGradScaler's flags have shape [1]; a fused optimizer subtracts them from its
            # 0-d step counters in place, which needs them 0-d, as GradScaler's own are.
            state = self._per_optimizer_states[id(optimizer)]
            state["found_inf_per_device"] = {d: f.reshape(()) for d, f in state["found_inf_per_device"].items()}

    return LocalTensorGradScaler(strategy.device.type) if strategy.precision == "fp16" else None


class Strategy:
    """The contract, with the parts every strategy shares (plain, replicated training)."""

    needs_process_group = False  # True where a device mesh is built even for one process
    owns_step = False  # True where an engine clips, scales and steps itself (DeepSpeed): see step()

    def __init__(self, cfg: StrategyConfig, precision: str, trainer: TrainerConfig, env: DistEnv, device: torch.device) -> None:
        self.cfg, self.precision, self.trainer, self.env, self.device = cfg, precision, trainer, env, device
        self.dims = ParallelDims.from_config(cfg, env.world_size)
        hardware.check(device, cfg.name, precision)  # this rank's own device: a node may differ from the submitter

    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this rank trains on."""
        return self.dims.dp_rank(self.env.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def build(self, model: Transformer, seed: int) -> nn.Module:
        """Materialize ``model`` (on the meta device) on this rank, initialize it, wrap it.

        Returns the model to train: ``model`` itself, a wrapper that holds it as ``.module`` (DDP),
        or a Transformer of the same config built in place of it (ZeRO-3's partitioned construction).
        """
        if self.precision == "fp8":
            convert_to_fp8(model)
        prepare_blocks(model, self.trainer)
        model.to_empty(device=self.device)
        model.init_weights(seed)
        return self.wrap(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def attach_optimizer(
        self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, *, micro: int, accum: int, grad_clip: float
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Hand the optimizer to the strategy, where an engine wraps model and optimizer together."""
        return wrapped, optimizer

    def files(self) -> dict[str, str]:
        """Files for the run directory that describe how this strategy runs (name -> text)."""
        return {}

    def backward(self, wrapped: nn.Module, loss: torch.Tensor, *, boundary: bool) -> None:
        """Backward of one micro-batch; ``boundary``: the last of the accumulation (gradients sync)."""
        loss.backward()

    def step(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
        """Clip, step and zero gradients in one call, for strategies that own the step: (norm, skipped)."""
        raise NotImplementedError(f"{type(self).__name__} leaves the step to the trainer (owns_step is False)")

    def engine_scaler_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The fp16 loss scaler's state where the strategy's engine keeps its own (with ``"scale"``)."""
        return None

    def load_engine_scaler_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        pass

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
