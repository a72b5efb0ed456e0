"""The search space of ``fmtrain tune``: distributions written in the config, parsed and checked
before Ray starts, and each trial's values applied to the composed config.

    tune.space: {optim.lr: "loguniform(1e-4, 1e-2)", model.n_layers: "choice([2, 4])"}
    space = parse_space(cfg.tune)                     # key -> Distribution, or ConfigError
    trial_cfg = apply_overrides(cfg, {"optim.lr": 3e-4})
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from typing import Any

from fmtrain.config import ConfigError, TrainConfig, TuneConfig, typing_hints

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


@dataclasses.dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple[Any, ...]

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args[0]))
        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*self.args)

    def values(self) -> list[Any]:
        """For PBT's explore step: the values a trial may move to (None: continuous)."""
        return list(self.args[0]) if self.kind in ("choice", "grid") else []


def parse_distribution(key: str, text: str) -> Distribution:
    """``loguniform(1e-4, 1e-2)`` -> Distribution; refuses what Ray Tune could not sample."""
    match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", str(text), re.S)
    if not match or match.group(1) not in DISTRIBUTIONS:
        raise ConfigError(f"tune.space.{key}", text, f"must be one of {', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
    kind = match.group(1)
    try:
        args = ast.literal_eval(f"({match.group(2)},)")
    except (ValueError, SyntaxError) as error:
        raise ConfigError(f"tune.space.{key}", text, f"cannot read the arguments: {error}") from error
    if kind in ("choice", "grid"):
        if len(args) != 1 or not isinstance(args[0], list | tuple) or not args[0]:
            raise ConfigError(f"tune.space.{key}", text, f"{kind} takes one non-empty list, e.g. {kind}([1e-3, 3e-3])")
    else:
        if len(args) != 2 or not all(isinstance(a, int | float) for a in args) or not args[0] < args[1]:
            raise ConfigError(f"tune.space.{key}", text, f"{kind} takes two numbers low < high, e.g. {kind}(1e-4, 1e-2)")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"tune.space.{key}", text, "loguniform needs low > 0")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"tune.space.{key}", text, "randint takes two integers")
    return Distribution(kind, tuple(args))


def _field_type(key: str) -> Any:
    """The schema type of a dotted config key, or ConfigError naming the valid keys."""
    owner: Any = TrainConfig
    parts = key.split(".")
    for index, part in enumerate(parts):
        hints = typing_hints(owner)
        if part not in hints:
            where = ".".join(parts[:index]) or "the top level"
            raise ConfigError(f"tune.space.{key}", "", f"unknown config key; valid keys under {where}: {', '.join(hints)}")
        owner = hints[part]
        if index < len(parts) - 1 and not dataclasses.is_dataclass(owner):
            raise ConfigError(f"tune.space.{key}", "", f"{'.'.join(parts[: index + 1])} has no sub-keys")
    if dataclasses.is_dataclass(owner):
        raise ConfigError(f"tune.space.{key}", "", "names a section, not a value; e.g. optim.lr")
    return owner


def parse_space(tune: TuneConfig) -> dict[str, Distribution]:
    """Check the space before Ray starts: keys, distributions, and how they suit the search and the
    scheduler (each ``tune`` field on its own is checked by its domain, in ``validate``)."""
    if not tune.space:
        raise ConfigError(
            "tune.space", {}, "is empty: give at least one key, e.g. tune.space={optim.lr: 'loguniform(1e-4, 1e-2)'}"
        )
    space = {}
    for key, text in flatten(tune.space).items():
        kind = _field_type(key)
        space[key] = parse_distribution(key, text)
        if int in (kind, *typing.get_args(kind)) and space[key].kind in ("uniform", "loguniform"):
            raise ConfigError(
                f"tune.space.{key}", text, f"{key} is an integer: use randint(low, high) or choice([...]) to search it"
            )
    grids = [k for k, d in space.items() if d.kind == "grid"]
    if tune.search == "grid" and len(grids) != len(space):
        raise ConfigError(
            "tune.search",
            "grid",
            f"every tune.space value must be grid([...]); not: {', '.join(sorted(set(space) - set(grids)))}",
        )
    if tune.search == "optuna" and grids:
        raise ConfigError("tune.search", "optuna", f"Optuna samples; grid([...]) is for tune.search=grid ({', '.join(grids)})")
    if tune.scheduler == "pbt" and tune.search == "optuna":
        raise ConfigError("tune.scheduler", "pbt", "PBT explores by itself; use tune.search=random with it")
    return space


def check_values(cfg: TrainConfig, space: dict[str, Distribution]) -> None:
    """Refuse a space that proposes a value outside its field's domain (``choice([-1, 0])`` for
    ``model.n_layers``): every listed value, and both ends of a range. Whether a value suits the
    others (a head count that divides the width) depends on what else each trial draws: each
    trial validates its own config, and one that fails says why in ``results.csv``."""
    from omegaconf import OmegaConf

    from fmtrain.config import check_domains, to_config

    for key, dist in space.items():
        if dist.kind in ("choice", "grid"):
            candidates = list(dist.args[0])
        else:  # Ray's randint excludes its upper end
            candidates = [dist.args[0], dist.args[1] - 1 if dist.kind == "randint" else dist.args[1]]
        for value in candidates:
            try:
                node = OmegaConf.structured(cfg)
                OmegaConf.update(node, key, value, merge=False)
                check_domains(to_config(node))
            except ConfigError as error:
                raise ConfigError(f"tune.space.{key}", value, f"a trial would run with {error}") from error
            except Exception as error:  # OmegaConf's type check: a string for a number, ...
                raise ConfigError(f"tune.space.{key}", value, f"not a value of {key}: {error}".splitlines()[0]) from error


def check_trials(cfg: TrainConfig) -> None:
    """How trials run: one rank in the trial's process, N ranks on its node, or a Slurm job each."""
    lc = cfg.launcher
    if lc.name == "ray":
        raise ConfigError(
            "launcher.name", "ray", "the sweep itself runs on Ray; for N ranks per trial use launcher.nproc=N (on the "
            "trial's node) or launcher=slurm (a Slurm job per trial)"
        )  # fmt: skip
    if cfg.tune.scheduler == "pbt" and (lc.name != "local" or lc.nproc > 1):
        raise ConfigError(
            "tune.scheduler", "pbt", "PBT hands checkpoints between trials that train in Ray Tune's own processes: use "
            "launcher=local with launcher.nproc=1"
        )  # fmt: skip


def flatten(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{optim: {lr: d}}`` and ``{"optim.lr": d}`` alike -> ``{"optim.lr": d}``."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """``base`` with dotted keys set to ``values``, type-checked by the schema and validated."""
    from omegaconf import OmegaConf

    from fmtrain.config import to_config
    from fmtrain.validation import validate

    node = OmegaConf.structured(base)
    for key, value in values.items():
        OmegaConf.update(node, key, value, merge=False)
    cfg = to_config(node)
    validate(cfg)
    return cfg
