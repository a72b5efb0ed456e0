"""The model contract: what a strategy, the trainer, ``plan`` and ``export`` may ask of a model.

A model is a plain ``nn.Module`` whose forward maps token ids ``(batch, seq)`` to logits
``(batch, seq, vocab)``. Its :class:`ModelSpec` says everything else, so nothing outside the spec
imports the model's class:

    class MySpec(ModelSpec):
        name = "gpt2-small-ish"

        def build(self, cfg: ModelConfig) -> nn.Module:         # called on the meta device
            return MyModel(cfg)

        def init_weights(self, model, seed, assign=copy_value, parameters=None) -> None:
            draw_weights(parameters or model.named_parameters(), seed, assign, lambda name, shape: ...)

    fmtrain.models.register(MySpec())                          # then: fmtrain train model.arch=gpt2-small-ish

The blocks (``spec.blocks(model)``, by default ``model.blocks``) are the repeated layers: FSDP
shards each one, activation checkpointing recomputes them, ``trainer.compile`` compiles them.
Initialization draws every value from the seed on the CPU for the whole (unsharded) tensor, so a
run sharded over any number of ranks starts exactly where one process does. Tensor parallelism
needs a plan (:meth:`ModelSpec.tp_plan`); a model without one is refused ``strategy=tp|fsdp_tp``
before launch.

:class:`Recipe` is the spec with its config and its converters (fp8 today): what a strategy builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fmtrain.config import ConfigError, ModelConfig

# What modules' reset_parameters and nn.init do to a tensor in place: values only, never its shape. The
# nn.init functions that dispatch on their own come as themselves; the others as the methods they call.
_FILLS = frozenset(
    [getattr(torch.Tensor, name) for name in ("normal_", "uniform_", "erfinv_", "clamp_", "fill_", "zero_", "random_")]
    + [getattr(nn.init, name) for name in ("normal_", "uniform_", "constant_", "kaiming_uniform_")]
)


class _NoFillsOnMeta(TorchFunctionMode):
    """Skips in-place fills of meta tensors: they hold no values, and ``normal_``, ``erfinv_`` or ``clamp_``
    on meta load torch's Python meta kernels (~800 modules, 1.5 s) into a process that may need nothing
    else of them: the CLI sizing a model before launch."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _FILLS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for building a model: shapes and dtypes without memory or init draws."""
    with torch.device("meta"), _NoFillsOnMeta():
        yield


Assign = Callable[[torch.Tensor, torch.Tensor], None]  # (parameter, its whole value): copy the part it holds


def copy_value(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


@torch.no_grad()
def draw_weights(
    parameters: Iterable[tuple[str, torch.Tensor]],
    seed: int,
    assign: Assign,
    value: Callable[[str, torch.Size, torch.Generator], torch.Tensor],
) -> None:
    """Give each parameter ``value(name, shape, generator)``, in order, from one CPU generator seeded once.

    The values are whole fp32 tensors drawn on the CPU: the same on every rank, device and world
    size; ``assign`` copies the part a rank holds (a DTensor shard, a ZeRO-3 partition gathered).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in parameters:
        assign(param, value(name, param.shape, generator))


def truncated_normal(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std) clamped to +-3 std, in fp32 on the CPU."""
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).clamp_(-3 * std, 3 * std)


class StateDictAdapter(Protocol):
    """Names and layouts of another format (Hugging Face's) to and from fmtrain's state dict, and the
    config that format's loader reads (``config.json``: its class, sizes, rotary settings)."""

    def to_external(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def from_external(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def external_config(self) -> dict[str, object]: ...


class Converter(Protocol):
    """A model transform applied once on the meta device, before any strategy (:mod:`fmtrain.models.converters`)."""

    def convert(self, model: nn.Module, spec: ModelSpec) -> None: ...


class ModelSpec:
    """One architecture. Subclass it, set ``name``, implement :meth:`build` and :meth:`init_weights`."""

    name: str = ""
    # forward(tokens, position_ids=, document_ids=): several examples per row (data.packing=bfd),
    # positions restarting and attention within each
    packed_inputs: bool = False
    # trainer.compile=auto may compile the blocks: they compile without graph breaks and their compiled
    # training is tested against eager. Any architecture compiles with trainer.compile=true.
    compiles: bool = False

    def takes_packed(self, cfg: ModelConfig) -> bool:
        """Whether ``cfg``'s model takes packed rows (``packed_inputs``; per model where it depends on one)."""
        return self.packed_inputs

    def adapter(self, cfg: ModelConfig) -> StateDictAdapter | None:
        """Names and layouts of an external format (Hugging Face's) for ``cfg``'s state dict; None: none."""
        return None

    def build(self, cfg: ModelConfig) -> nn.Module:
        """The model for ``cfg``; called under ``torch.device("meta")`` (or DeepSpeed's ``zero.Init``)."""
        raise NotImplementedError

    def check(self, cfg: ModelConfig) -> None:
        """Refuse, with a :class:`ConfigError`, values of ``cfg`` this architecture cannot build."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The repeated layers: what FSDP shards, activation checkpointing recomputes, compile compiles."""
        return model.blocks  # type: ignore[return-value]

    def init_weights(
        self,
        model: nn.Module,
        seed: int,
        assign: Assign = copy_value,
        parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    ) -> None:
        """Initialize every parameter from ``seed`` (see :func:`draw_weights`); buffers too.

        ``parameters`` replaces ``model.named_parameters()`` (same names, same order) where a
        strategy makes each parameter whole while it is written (ZeRO-3 gathers one at a time).
        """
        raise NotImplementedError

    def init_buffers(self, model: nn.Module) -> None:
        """After ``to_empty()``, before loading a state dict: derived buffers, ties between weights."""

    def tp_plan(self, model: nn.Module) -> dict[str, str] | None:
        """Tensor parallelism: module path -> ``"colwise"`` | ``"rowwise"``; None: the model has none."""
        return None

    def sequence_parallel_plan(self, model: nn.Module) -> dict[str, str] | None:
        """With sequence parallelism, on top of the TP plan: path -> ``"split"`` | ``"norm"`` | ``"gather"``."""
        return None

    def tp_divides(self, cfg: ModelConfig) -> list[tuple[str, int]]:
        """Counts the tensor-parallel degree must divide, with their names (heads, hidden units)."""
        return []

    def flops_per_token(self, model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
        """Training FLOPs per token: 6 x the weights of linear layers (the head included, tied or not)
        + 12 x layers x dim x seq for attention's two matmuls (PaLM, app. B)."""
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        return 6.0 * linear + 12.0 * cfg.n_layers * cfg.dim * seq_len

    def export_config(self, cfg: ModelConfig) -> dict[str, object]:
        """Keys for an export's ``config.json`` that other tools read (Llama: Hugging Face's names)."""
        return {"architectures": [type(self).__name__.removesuffix("Spec")]}

    def check_tensor_parallel(self, cfg: ModelConfig, strategy: str, tp: int, sequence_parallel: bool) -> None:
        """Refuse, before launch, tensor parallelism this model has no plan for or cannot split by ``tp``."""
        with meta_device():
            model = self.build(cfg)
        if self.tp_plan(model) is None:
            raise ConfigError(
                "strategy.name",
                strategy,
                f"model.arch={self.name} has no tensor-parallel plan (its ModelSpec.tp_plan is None): use ddp, fsdp or deepspeed",
            )
        if sequence_parallel and self.sequence_parallel_plan(model) is None:
            raise ConfigError(
                "strategy.sequence_parallel",
                True,
                f"model.arch={self.name} has no sequence-parallel plan (ModelSpec.sequence_parallel_plan)",
            )
        for what, count in self.tp_divides(cfg):
            if count % tp:
                raise ConfigError("strategy.tp", tp, f"must divide {what} = {count}")


@dataclass
class Recipe:
    """A spec, its config and the converters to apply: everything a strategy needs to build the model.

    recipe = Recipe(get("llama"), cfg.model, converters_for(cfg))
    model = recipe.meta()           # on meta_device(): converters applied, nothing parallelized yet
    """

    spec: ModelSpec
    cfg: ModelConfig
    converters: list[Converter] = field(default_factory=list)

    def build(self) -> nn.Module:
        """The model in the current device context, each converter applied once, before any strategy."""
        model = self.spec.build(self.cfg)
        for converter in self.converters:
            converter.convert(model, self.spec)
        return model

    def meta(self) -> nn.Module:
        with meta_device():
            return self.build()

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.spec.blocks(model)

    def sizes(self, seq_len: int) -> tuple[int, float]:
        """Parameters (whole, before any sharding) and training FLOPs per token, from one meta build."""
        model = self.meta()
        return sum(p.numel() for p in model.parameters()), self.spec.flops_per_token(model, self.cfg, seq_len)
