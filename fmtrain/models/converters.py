"""Model converters: transforms applied once to the model on the meta device, before any strategy
parallelizes it, under every strategy (fp8 today; LoRA, quantization-aware training and pruning
masks are converters too).

    converters = converters_for(cfg)               # from the config: precision=fp8 -> [Float8]
    recipe = Recipe(spec, cfg.model, converters)   # recipe.build() applies them after spec.build()

A converter is one class with ``convert(model, spec)``: it may swap modules inside the spec's
blocks (``spec.blocks(model)``) but keeps parameter names stable, so checkpoints and the seeded
init see the same names under every strategy.
"""

from __future__ import annotations

from torch import nn

from fmtrain.config import TrainConfig
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


def converters_for(cfg: TrainConfig) -> list[Converter]:
    """The converters a run's config asks for, in the order they apply."""
    return [Float8()] if cfg.precision.name == "fp8" else []
