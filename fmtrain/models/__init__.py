"""Models by name: ``model.arch`` picks a :class:`ModelSpec` from this registry.

    from fmtrain import models

    spec = models.get("llama")                      # the default; model=tiny|small|1b|8b size it
    recipe = models.recipe(cfg)                     # spec + cfg.model + converters (fp8)

Your own model registers itself when its module is imported; ``imports=[...]`` makes every process
of a run (each rank, on every launcher) import it before anything is built:

    # my_models.py
    from fmtrain import models

    class GPT2Spec(models.ModelSpec):
        name = "gpt2"
        ...

    models.register(GPT2Spec())

    fmtrain train imports=[my_models] model.arch=gpt2 strategy=fsdp launcher.nproc=2

The contract is :mod:`fmtrain.models.spec`; the Llama decoder (:mod:`fmtrain.models.llama`) is the
first entry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fmtrain.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fmtrain.models.spec import ModelSpec, Recipe

__all__ = ["ModelSpec", "Recipe", "get", "import_modules", "names", "recipe", "register"]

_SPECS: dict[str, ModelSpec] = {}


def __getattr__(name: str) -> Any:
    # The contract loads torch: ``import fmtrain.models`` (validation, the CLI) does not, until asked.
    if name in ("ModelSpec", "Recipe"):
        from fmtrain.models import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'fmtrain.models' has no attribute {name!r}")


def register(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` available as ``model.arch=<spec.name>``; registering the same name again replaces it."""
    if not spec.name:
        raise ValueError(f"{type(spec).__name__}.name is empty: a spec needs the name model.arch will use")
    _SPECS[spec.name] = spec
    return spec


def _builtin() -> None:
    if "llama" not in _SPECS:
        from fmtrain.models.custom import CustomSpec
        from fmtrain.models.hf_auto import HFAutoSpec
        from fmtrain.models.llama import LlamaSpec

        register(LlamaSpec())
        register(HFAutoSpec())
        register(CustomSpec())


def names() -> list[str]:
    _builtin()
    return sorted(_SPECS)


def get(name: str) -> ModelSpec:
    """The spec registered as ``name``.

    Raises:
        ConfigError: for a name nothing registered, listing the names that are.
    """
    _builtin()
    if name not in _SPECS:
        raise ConfigError(
            "model.arch", name, f"one of {', '.join(names())} (a model of your own: imports=[your_module] that registers it)"
        )
    return _SPECS[name]


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules a run names in ``imports`` (where user models register themselves).

    Raises:
        ConfigError: naming the module that cannot be imported and why.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure of the user's module is the user's input to fix
            raise ConfigError("imports", module, f"cannot be imported: {type(error).__name__}: {error}") from error


def recipe(cfg: TrainConfig) -> Recipe:
    """What a strategy builds for ``cfg``: the spec of ``model.arch``, its config and its converters."""
    from fmtrain.models.converters import converters_for
    from fmtrain.models.spec import Recipe

    import_modules(cfg.imports)
    return Recipe(get(cfg.model.arch), cfg.model, converters_for(cfg))
