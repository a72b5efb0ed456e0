"""Compose and check configs the way ``fmtrain train`` will, without starting anything.

    cfg = compose(["model=tiny", "trainer.max_steps=10"])       # -> TrainConfig, validated
    for overrides in expand_sweep(["optim.lr=1e-3,3e-4"]):      # what -m would run, one by one
        compose(overrides)

Hydra's and OmegaConf's exceptions are turned into :class:`UsageError` with one message in the
user's words: the field, the value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from importlib import resources
from pathlib import Path
from typing import Any

from fmtrain.config import ConfigError, TrainConfig, foreign_keys, register_schema, schema_type, to_config
from fmtrain.validation import validate


class UsageError(Exception):
    """A command line that fmtrain refuses before starting anything (exit code 2)."""


def conf_dir() -> Path:
    """The YAML groups: shipped inside the wheel as ``fmtrain/conf``, or ``conf/`` in a checkout."""
    packaged = Path(str(resources.files("fmtrain"))) / "conf"
    if (packaged / "train.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


def group_options() -> dict[str, list[str]]:
    """Each config group and its options, e.g. ``{"model": ["1b", "8b", "small", "tiny"]}``."""
    root = conf_dir()
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir()}


# mappings of free keys: strategy.deepspeed's JSON, launcher.sbatch's flags, a custom model's arguments
FREE_MAPS = ("model.options", "strategy.deepspeed", "launcher.sbatch", "tune.space")


def _schema_fields(key: str) -> list[str] | None:
    """Field names of the dataclass at dotted ``key`` (``""`` is the root), if it is one."""
    node: Any = TrainConfig
    for part in filter(None, key.split(".")):
        if not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        default = fields[part].default_factory  # type: ignore[misc]
        if default is dataclasses.MISSING:
            return None
        node = type(default())
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None


def _explain(error: BaseException, overrides: list[str]) -> str:
    """One sentence for the user from a Hydra/OmegaConf composition error."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    for exc in chain:
        if isinstance(exc, ConfigError):  # raised by a resolver (${hf:...}): it names its field itself
            return str(exc)
        if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
            group = exc.missing_cfg_file.rsplit("/", 1)[0] if "/" in exc.missing_cfg_file else ""
            if group in group_options():
                valid = ", ".join(group_options()[group])
                return f"{group}={values.get(group, '?')!s}: no such option; valid choices are {valid}"
        if isinstance(exc, OverrideParseException):
            if "Unknown function" in str(exc) and (m := re.search(r"evaluating '(\w+\(.*?\))'", str(exc))):
                return (
                    f"cannot parse override: {m.group(1)} reads as a Hydra function call; a search-space "
                    f'distribution is a string, quote it: key="{m.group(1)}"'
                )
            return f"cannot parse override: {str(exc).splitlines()[0]}"
    for exc in chain:
        if not isinstance(exc, OmegaConfBaseException):
            continue
        key = exc.full_key or ""
        value = values.get(key, getattr(exc, "value", None))
        if isinstance(exc, MissingMandatoryValue):
            return f"{key} is required: set it on the command line, e.g. {key}=..."
        if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
            parent = key.rpartition(".")[0]
            fields = _schema_fields(parent)
            if parent in FREE_MAPS:  # any key goes, but Hydra adds a key only when asked to
                name = key.rpartition(".")[2]
                return f"{parent} takes any key, added with a leading +: +{key}=VALUE, or ++{parent}={{{name}: VALUE, ...}}"
            where = f"under '{parent}'" if parent else "at the top level"
            valid = f"; valid keys {where}: {', '.join(fields)}" if fields else ""
            return f"unknown key '{key}'{valid}"
        if isinstance(exc, ValidationError):
            reason = str(exc).splitlines()[0]
            if "could not be converted to " in reason:
                reason = "expected " + reason.rsplit("could not be converted to ", 1)[1].lower()
            return f"{key}={value!r} is invalid: {reason}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def compose(
    overrides: list[str], *, check: bool = True, gpus_available: int | None = None, option_keys: bool = True
) -> TrainConfig:
    """The typed config that ``fmtrain train OVERRIDES`` would run, validated when ``check``; a key of
    another strategy or launcher than the chosen one refused when ``option_keys``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [unalias(o) for o in overrides]
    check_booleans(overrides)
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            node = hydra_compose(config_name="train", overrides=overrides)
            cfg = to_config(node)
    except Exception as error:  # Hydra wraps its causes in several exception types
        raise UsageError(_explain(error, overrides)) from error
    finally:
        GlobalHydra.instance().clear()
    try:
        if check:
            validate(cfg, gpus_available=gpus_available)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    if option_keys:
        check_option_keys(cfg, overrides)
    return cfg


# Names users type that are not Python identifiers: `async` is a keyword, so the field is async_save.
ALIASES = {"checkpoint.async": "checkpoint.async_save"}


def unalias(override: str) -> str:
    """``checkpoint.async=true`` -> ``checkpoint.async_save=true`` (a ``+``/``~`` prefix kept)."""
    stripped = override.lstrip("+~")
    key, sep, value = stripped.partition("=")
    if key not in ALIASES:
        return override
    return override[: len(override) - len(stripped)] + ALIASES[key] + sep + value


def check_booleans(overrides: list[str]) -> None:
    """Refuse ``trainer.progress=-1`` and the like: OmegaConf reads any integer as a boolean (non-zero:
    true), so a typo turns a switch on. A boolean field takes true or false."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and schema_type(key) is bool and value.strip().lower() not in ("true", "false"):
            raise UsageError(str(ConfigError(key, value, "must be true or false")))


def check_option_keys(cfg: TrainConfig, overrides: list[str]) -> None:
    """Refuse an override of a key that the chosen strategy or launcher does not have.

    Run after validation where both run: its messages say more where they apply (``strategy.tp`` with ddp).
    """
    try:
        foreign_keys(cfg, [o.lstrip("+~").split("=", 1)[0] for o in overrides])
    except ConfigError as error:
        raise UsageError(str(error)) from error


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override lists of each job a ``-m`` sweep would run (cartesian product of sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:
        raise UsageError(f"cannot parse overrides: {str(error).splitlines()[0]}") from error
    axes = []
    for override in parsed:
        if override.is_sweep_override():
            if override.is_discrete_sweep() is False:
                raise UsageError(f"{override.input_line}: only discrete sweeps (a,b,c or choice(...)) are supported")
            axes.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
        else:
            axes.append([str(override.input_line)])
    return [list(combo) for combo in itertools.product(*axes)]
