"""DeepSpeed ZeRO stages 1, 2 and 3: optimizer state, then gradients, then parameters partitioned.

    strategy=deepspeed strategy.zero_stage=3 [strategy.offload_optimizer=true] [strategy.offload_params=true]

The DeepSpeed engine owns the update: gradient reduction and partitioning, clipping, loss scaling
(fp16) and the optimizer step. Its JSON config is generated from the typed config
(:func:`deepspeed_config`), merged with ``strategy.deepspeed`` (extra keys, passed through) and written
to the run directory as ``deepspeed_config.json``.

Checkpoints are fmtrain's, not DeepSpeed's: each parameter's fp32 master value and AdamW moments are
gathered one parameter at a time and saved as ``Shard(0)`` DTensors under the model's own names,
exactly the layout FSDP2 writes. So a ZeRO-3 run resumes under FSDP or DDP at another world size,
and the other way round. Loading reads the shards, gathers each parameter and hands each rank its
partition of the fp32 master, the moments and the (low-precision) model parameter.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fmtrain.compat.deepspeed import (
    link_optimizer_state,
    load_loss_scaler_state,
    loss_scaler_state,
    master_partitions,
    share_fp32_master,
    skip_shared_memory_all_reduce,
)
from fmtrain.config import accumulation_steps, micro_batch_size
from fmtrain.models.spec import Recipe
from fmtrain.optim import decays
from fmtrain.strategies.base import StepStats, Strategy, initialize, prepare_blocks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested dictionaries merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(
    *,
    zero_stage: int,
    precision: str,
    micro: int,
    accum: int,
    dp_size: int,
    grad_clip: float,
    offload_optimizer: bool,
    offload_params: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The DeepSpeed JSON config a run trains with (a pure function of fmtrain's config)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        # Parameters are gathered per block as it runs and released after (like FSDP's reshard).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_batch_size": micro * accum * dp_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling, torch GradScaler's defaults: start at 2**16, halve on overflow.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000},
        # fmtrain's AdamW (decay on matrices only) is the optimizer; with offload it runs on the CPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # fmtrain logs the steps
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, extra)


def _gathered_one_at_a_time(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters()`` of a ZeRO-3 model, each parameter whole while the caller holds it and
    partitioned again (from rank 0's values, which every rank drew alike) when the next is asked for."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            yield name, param


class DeepSpeedStrategy(Strategy):
    needs_process_group = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config: dict[str, Any] = {}
        self._mesh: DeviceMesh | None = None
        self._state_bytes = 0

    @property
    def stage(self) -> int:
        return self.cfg.zero_stage

    def build(self, recipe: Recipe, seed: int | None) -> nn.Module:
        if self.stage == 3 and self.cfg.zero_init:
            # Each layer is partitioned as soon as it is made, and each parameter is gathered alone
            # to take its seeded value: no rank holds more than one whole parameter at a time.
            deepspeed = self._start_deepspeed()
            micro, accum = micro_batch_size(self.trainer, self.dp_size), accumulation_steps(self.trainer, self.dp_size)
            # zero.Init reads the precision and zero_optimization sections (dtype, parameter offload).
            config = self._config(micro, accum, grad_clip=0.0)
            with contextlib.redirect_stdout(io.StringIO()), deepspeed.zero.Init(config_dict_or_path=config):
                model = recipe.build()
            prepare_blocks(recipe.blocks(model), self.trainer)
            if seed is None:  # every weight is loaded next, one gathered parameter at a time
                recipe.spec.init_buffers(model)
            else:
                recipe.spec.init_weights(model, seed, parameters=_gathered_one_at_a_time(model))
            return model
        # Materialized whole on every rank, then partitioned by the engine (attach_optimizer).
        model = recipe.meta()
        prepare_blocks(recipe.blocks(model), self.trainer)
        model.to_empty(device=self.device)
        initialize(recipe, model, seed)
        return model

    def attach_optimizer(
        self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, *, micro: int, accum: int, grad_clip: float
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        deepspeed = self._start_deepspeed()
        self.config = self._config(micro, accum, grad_clip)
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its op builds to stdout
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=self.config)
        share_fp32_master(ds_optimizer)
        return engine, ds_optimizer

    def _start_deepspeed(self) -> Any:
        """Import DeepSpeed quietly and start its communication on torch's process group."""
        import os

        from fmtrain.config import cache_root

        # DeepSpeed compiles its CPU ops on first use (cpu_adam for offload_optimizer): once per machine, into
        # fmtrain's cache. The shared-memory all-reduce it would build as its communication starts is not one.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions"))
        os.environ.setdefault("DS_ACCELERATOR", self.device.type)  # no probing, no warning about it
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed calls torch's all_gather_into_tensor/reduce_scatter_tensor, deprecated in torch 2.13.
        warnings.filterwarnings("ignore", message=r".* is deprecated\. Please use .*_single", category=FutureWarning)
        skip_shared_memory_all_reduce()
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its op builds to stdout
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        return deepspeed

    def _config(self, micro: int, accum: int, grad_clip: float) -> dict[str, Any]:
        return deepspeed_config(
            zero_stage=self.stage,
            precision=self.precision,
            micro=micro,
            accum=accum,
            dp_size=self.dp_size,
            grad_clip=grad_clip,
            offload_optimizer=self.cfg.offload_optimizer,
            offload_params=self.cfg.offload_params,
            extra=dict(self.cfg.deepspeed),
        )

    def files(self) -> dict[str, str]:
        import json

        return {"deepspeed_config.json": json.dumps(self.config, indent=1, sort_keys=True)}

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds bf16/fp16 parameters itself

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module) -> Iterator[None]:
        yield  # the accumulation boundary is set in backward()

    def backward(self, wrapped: nn.Module, loss: torch.Tensor, *, boundary: bool) -> None:
        wrapped.set_gradient_accumulation_boundary(boundary)  # type: ignore[operator]
        wrapped.backward(loss, scale_wrt_gas=False)  # type: ignore[operator]  # the trainer divides by accum

    def optimizer_step(
        self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, *, loss_finite: bool
    ) -> StepStats:
        """The engine clips (to the ``gradient_clipping`` of its config) and steps, or skips on an
        fp16 overflow and lowers its scale. A non-finite loss leaves the engine alone: the trainer
        ends the run (validation refuses ``trainer.on_nonfinite=skip`` here)."""
        engine: Any = wrapped
        if not loss_finite:
            return StepStats(float("nan"), False, False, self._state_bytes, self.optimizer_state_bytes(optimizer))
        skipped_before = engine.skipped_steps
        engine.step()
        self._state_bytes = self._held_bytes(engine, optimizer)
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        overflow = engine.skipped_steps > skipped_before
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        applied = not overflow and math.isfinite(norm)
        return StepStats(norm, applied, overflow, self._state_bytes, self.optimizer_state_bytes(optimizer))

    def scaler_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = loss_scaler_state(optimizer) if self.precision == "fp16" else None
        return {"engine_loss_scaler": state} if state is not None else {}  # DeepSpeed's own

    def load_scaler_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if (saved := state.get("engine_loss_scaler")) and self.scaler_state(optimizer):
            load_loss_scaler_state(optimizer, saved)

    def loss_scale(self, optimizer: torch.optim.Optimizer) -> float | None:
        return state["engine_loss_scaler"]["scale"] if (state := self.scaler_state(optimizer)) else None

    def clip_grad_norm(self, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
        raise NotImplementedError("the DeepSpeed engine clips inside step()")

    # ------------------------------------------------------------------ memory

    def state_bytes(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        return self._state_bytes  # measured in optimizer_step(), while the gradient partitions are held

    def optimizer_state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        base: Any = optimizer.optimizer  # type: ignore[attr-defined]
        return super().optimizer_state_bytes(base)

    def _held_bytes(self, engine: Any, optimizer: Any) -> int:
        """Bytes that stay allocated from step to step: model parameters (this rank's partitions under
        ZeRO-3), fp32 master partitions (none in fp32: they are the parameters), AdamW state and the
        gradient buffers DeepSpeed keeps, each storage counted once. Buffers that live only inside
        the engine's step show in peak memory instead."""
        storages: dict[int, int] = {}

        def add(t: torch.Tensor | None) -> None:
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())

        for param in engine.module.parameters():
            add(param.ds_tensor if hasattr(param, "ds_tensor") else param.data)
            add(param.grad)
        for flat in master_partitions(optimizer):
            add(flat)
            add(flat.grad)
        for state in optimizer.optimizer.state.values():
            for value in state.values():
                add(value if isinstance(value, torch.Tensor) and value.ndim else None)
        for name in ("averaged_gradients", "grad_partitions_flat_buffer"):
            held = getattr(optimizer, name, None)
            values = held.values() if isinstance(held, dict) else held if isinstance(held, list | tuple) else [held]
            for value in values:
                for t in value if isinstance(value, list | tuple) else [value]:
                    add(t)
        return sum(storages.values())

    # ------------------------------------------------------------------ checkpoints

    def _shard(self, full: torch.Tensor) -> torch.Tensor:
        """The DTensor over all ranks, sharded on dim 0 (FSDP2's layout) from a value every rank holds."""
        from torch.distributed.tensor import Shard, distribute_tensor

        if self._mesh is None:
            self._mesh = self.dims.build_mesh(self.device.type)["dp"]
        return distribute_tensor(full.float(), self._mesh, [Shard(0)], src_data_rank=None)

    def _named_params(self, wrapped: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return list(wrapped.module.named_parameters())  # type: ignore[union-attr]

    def state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model and AdamW state under the plain model's names, as ``Shard(0)`` DTensors.

        Before the first step the optimizer has no state yet: the result is then a template of the
        right shapes (zeros) for ``torch.distributed.checkpoint.load`` to fill.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base: Any = optimizer.optimizer  # type: ignore[attr-defined]
        has_state = bool(base.state)
        if has_state:
            link_optimizer_state(optimizer)
        step = self._step_count(base)
        model: dict[str, Any] = {}
        moments: dict[str, Any] = {}
        for name, param in self._named_params(wrapped):
            shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
            if has_state:
                model[name] = self._shard(safe_get_full_fp32_param(param).reshape(shape))
                entry = {k: self._shard(safe_get_full_optimizer_state(param, k).reshape(shape)) for k in ADAM_KEYS}
            else:
                model[name] = self._shard(torch.zeros(shape, device=self.device))
                entry = {k: self._shard(torch.zeros(shape, device=self.device)) for k in ADAM_KEYS}
            moments[name] = {"step": torch.tensor(float(step)), **entry}
        tied = self._tied_names(wrapped)
        for alias, name in tied.items():
            model[alias] = model[name]
        # The groups' hyper-parameters with their parameters by name, as torch's get_state_dict writes them.
        names = {id(p): n for n, p in self._named_params(wrapped)}
        by_group = self._param_groups_by_name(wrapped, names)
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": params}
            for group, params in zip(base.param_groups, by_group, strict=True)
        ]
        return {"model": model, "optim": {"state": moments, "param_groups": groups}}

    def load_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        base: Any = optimizer.optimizer  # type: ignore[attr-defined]
        moments = state["optim"]["state"]
        step = next(iter(moments.values()))["step"]
        for flat in master_partitions(optimizer):  # AdamW creates its state lazily: create it to write into
            flat_state = base.state[flat]
            for key in ADAM_KEYS:
                flat_state.setdefault(key, torch.zeros_like(flat))
            flat_state["step"] = step.detach().clone().float().to(flat.device)  # fused AdamW: on the state's device
        link_optimizer_state(optimizer)
        for name, param in self._named_params(wrapped):
            full = state["model"][name].full_tensor()
            safe_set_full_fp32_param(param, full)
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(param, moments[name][key].full_tensor(), key)
            # The engine computes with its own (possibly bf16/fp16, possibly partitioned) copy.
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.env.rank == 0:
                        param.data.copy_(full.to(param.dtype).reshape(param.shape))
            else:
                param.data.copy_(full.to(param.dtype).reshape(param.shape))

    def _step_count(self, base: Any) -> int:
        for state in base.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def _tied_names(self, wrapped: nn.Module) -> dict[str, str]:
        """Names of parameters shared under a second name (tied embeddings): alias -> first name."""
        module: Any = wrapped.module  # type: ignore[union-attr]
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) in first:
                aliases[name] = first[id(param)]
            else:
                first[id(param)] = name
        return aliases

    def _param_groups_by_name(self, wrapped: nn.Module, names: dict[int, str]) -> list[list[str]]:
        """The names in each of fmtrain's AdamW groups (matrices decay, vectors do not), in order."""
        params = [p for _, p in self._named_params(wrapped) if p.requires_grad]
        return [[names[id(p)] for p in params if decays(p)], [names[id(p)] for p in params if not decays(p)]]
