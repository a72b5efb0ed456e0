"""Model converters: transforms applied once to the model on the meta device, before any strategy
parallelizes it, under every strategy (fp8, freezing parameters; LoRA, quantization-aware training and pruning
masks are converters too).

    converters = converters_for(cfg)               # from the config: precision=fp8 -> [Float8]
    recipe = Recipe(spec, cfg.model, converters)   # recipe.build() applies them after spec.build()

A converter is one class with ``convert(model, spec)``: it may swap modules inside the spec's
blocks (``spec.blocks(model)``) but keeps parameter names stable, so checkpoints and the seeded
init see the same names under every strategy.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from fmtrain.config import ConfigError, TrainConfig
from fmtrain.models.spec import Converter, ModelSpec


class Float8:
    """Swap the blocks' linear layers for torchao's Float8Linear (dynamic tensorwise scaling).

    Layers outside the blocks stay in bf16 (the output head's logits feed the loss; torchtitan does
    the same), and so does any layer whose sizes are not multiples of 16 (fp8 matmuls need them).
    """

    def convert(self, model: nn.Module, spec: ModelSpec) -> None:
        from torchao.float8 import convert_to_float8_training

        inside = {id(module) for block in spec.blocks(model) for module in block.modules()}

        def eligible(module: nn.Module, fqn: str) -> bool:
            return (
                isinstance(module, nn.Linear)
                and id(module) in inside
                and not module.in_features % 16
                and not module.out_features % 16
            )

        convert_to_float8_training(model, module_filter_fn=eligible)


class Freeze:
    """Keep the parameters whose names match any of ``patterns`` fixed (``trainer.freeze``).

    Patterns are shell-style (``fnmatch``) over the model's own parameter names, e.g.
    ``tok_embeddings.weight`` or ``blocks.[0-3].*``. A frozen parameter has ``requires_grad=False``
    before any strategy sees it: DDP, FSDP and DeepSpeed keep no gradient for it, and the optimizer
    (built from the parameters that require one) holds no state for it.
    """

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = list(patterns)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    def convert(self, model: nn.Module, spec: ModelSpec) -> None:
        for name, param in model.named_parameters():
            if self.matches(name):
                param.requires_grad_(False)


def check_freeze(cfg: TrainConfig, model: nn.Module) -> None:
    """Refuse, before launch, a ``trainer.freeze`` pattern that matches no parameter of ``model``
    (a typo would silently train everything) or patterns that leave nothing to train."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in cfg.trainer.freeze:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(
                "trainer.freeze",
                pattern,
                f"matches no parameter of model.arch={cfg.model.arch}; "
                f"its names are like {', '.join(names[:3])}, ..., {names[-1]}",
            )
    if cfg.trainer.freeze and all(Freeze(cfg.trainer.freeze).matches(name) for name in names):
        raise ConfigError("trainer.freeze", cfg.trainer.freeze, "freezes every parameter: nothing would train")


def converters_for(cfg: TrainConfig) -> list[Converter]:
    """The converters a run's config asks for, in the order they apply."""
    converters: list[Converter] = [Float8()] if cfg.precision.name == "fp8" else []
    if cfg.trainer.freeze:
        converters.append(Freeze(cfg.trainer.freeze))
    return converters
