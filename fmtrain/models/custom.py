"""Your own ``nn.Module``, without writing a spec: ``model=custom model.target=package.module.builder``.

    # my_models/gpt.py (importable on every node: installed, or on PYTHONPATH)
    def build(vocab_size: int, dim: int, n_layers: int) -> nn.Module:
        return MyGPT(...)          # forward(ids (batch, seq)) -> logits (batch, seq, vocab)

    fmtrain train model=custom model.target=my_models.gpt.build \\
        'model.options={vocab_size: 256, dim: 256, n_layers: 4}' strategy=fsdp launcher.nproc=2

``model.options`` are the builder's keyword arguments; a builder that takes ``vocab_size`` or
``max_seq_len`` also gets ``model.vocab_size`` / ``model.max_seq_len`` (what the tokenizer and
``data.seq_len`` are checked against). It is called on the meta device (no memory
is taken until each rank materializes its own part), and the module it returns keeps this small
protocol, read with ``getattr``:

- ``blocks`` (required): the repeated layers, a sequence of modules: what FSDP shards, activation
  checkpointing recomputes, ``trainer.compile`` compiles.
- ``init_value(name, shape, generator) -> Tensor`` (optional): the initial value of a parameter,
  drawn from the generator; fmtrain calls it for every parameter in order from one seeded CPU
  generator, so every world size starts from the same weights. Without it: N(0, 0.02) (or the
  module's ``init_std``) for matrices, 0 for biases, 1 for other vectors (norm gains).
- ``init_buffers()`` (optional): recompute buffers after the module gets memory (rotary tables).
- ``tp_plan() -> {module path: "colwise" | "rowwise"}`` (optional): enables ``strategy=tp|fsdp_tp``.
- ``flops_per_token(seq_len) -> float`` (optional): training FLOPs per token, for MFU; without it,
  6 x the weights of the blocks' matrices.

Everything else is as for fmtrain's own models: checkpoints (any strategy, any world size), exact
resume, ``fmtrain export --format fmtrain`` (``load_exported`` rebuilds it through the builder).
``examples/custom_model/`` has one to copy.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fmtrain.config import ConfigError, ModelConfig
from fmtrain.models.spec import Assign, ModelSpec, copy_value, draw_weights, meta_device


def builder(target: str) -> Callable[..., nn.Module]:
    """The callable ``package.module.name`` names, refused with ``model.target`` named."""
    if not target:
        raise ConfigError(
            "model.target", target, "required with model=custom: the callable that builds your module, package.module.builder"
        )
    module_name, _, name = target.rpartition(".")
    if not module_name:
        raise ConfigError("model.target", target, "must be package.module.builder, a callable that returns an nn.Module")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any failure is the user's to fix
        raise ConfigError(
            "model.target", target, f"{module_name} cannot be imported ({type(error).__name__}: {error}); is it on PYTHONPATH?"
        ) from error
    found = getattr(module, name, None)
    if not callable(found):
        raise ConfigError("model.target", target, f"{module_name} has no callable {name}")
    return found


# ModelConfig's fields that the data checks use, handed to a builder that takes them
SHARED = ("vocab_size", "max_seq_len")


def arguments(cfg: ModelConfig) -> dict[str, Any]:
    """``model.options``, plus ``vocab_size`` and ``max_seq_len`` from ``model.*`` for a builder that
    takes them (so the tokenizer and ``data.seq_len`` are checked against what the module has)."""
    make = builder(cfg.target)
    options = dict(cfg.options)
    try:
        parameters = inspect.signature(make).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        parameters = {}  # type: ignore[assignment]
    for name in SHARED:
        value = getattr(cfg, name)
        if name in options and options[name] != value:
            raise ConfigError(
                f"model.options.{name}",
                options[name],
                f"must equal model.{name}={value}, which the builder gets when options leave it out: set model.{name}",
            )
        if name in parameters:
            options[name] = value
    return options


class CustomSpec(ModelSpec):
    name = "custom"

    def build(self, cfg: ModelConfig) -> nn.Module:
        return builder(cfg.target)(**arguments(cfg))

    def check(self, cfg: ModelConfig) -> None:
        make = builder(cfg.target)
        options = arguments(cfg)
        try:
            with meta_device():
                model = make(**options)
        except Exception as error:
            raise ConfigError(
                "model.options", dict(cfg.options), f"{cfg.target}(**model.options) failed: {type(error).__name__}: {error}"
            ) from error
        if not isinstance(model, nn.Module):
            raise ConfigError("model.target", cfg.target, f"returned a {type(model).__name__}, not an nn.Module")
        blocks = getattr(model, "blocks", None)
        if not blocks or not all(isinstance(block, nn.Module) for block in blocks):
            raise ConfigError(
                "model.target",
                cfg.target,
                f"{type(model).__name__} needs .blocks, its repeated layers (a list or nn.ModuleList of modules)",
            )

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]

    def init_weights(
        self,
        model: nn.Module,
        seed: int,
        assign: Assign = copy_value,
        parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    ) -> None:
        value = getattr(model, "init_value", None) or _generic_init(getattr(model, "init_std", 0.02))
        draw_weights(parameters or model.named_parameters(), seed, assign, value)
        self.init_buffers(model)

    def init_buffers(self, model: nn.Module) -> None:
        if callable(init := getattr(model, "init_buffers", None)):
            with torch.no_grad():
                init()

    def tp_plan(self, model: nn.Module) -> dict[str, str] | None:
        plan = getattr(model, "tp_plan", None)
        return plan() if callable(plan) else None

    def flops_per_token(self, model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
        if callable(flops := getattr(model, "flops_per_token", None)):
            return float(flops(seq_len))
        return 6.0 * sum(p.numel() for block in self.blocks(model) for p in block.parameters() if p.dim() == 2)

    def export_config(self, cfg: ModelConfig) -> dict[str, object]:
        return {"architectures": [cfg.target]}


def _generic_init(std: float) -> Callable[[str, torch.Size, torch.Generator], torch.Tensor]:
    def value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        if name.endswith("bias"):
            return torch.zeros(shape)
        if len(shape) < 2:
            return torch.ones(shape)
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    return value
