"""The schema at its boundaries: Hydra's ``DictConfig`` in, ``config.yaml`` out and back, and the
small derived values every layer asks for (paths, CPUs, batch arithmetic)."""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from pathlib import Path
from typing import Any

from fmtrain.config.domains import ConfigError
from fmtrain.config.schema import TrainConfig, TrainerConfig


def register_schema() -> None:
    """Register the schema in Hydra's ConfigStore as ``train_schema`` (the first default), and the
    ``${hf:...}`` resolver that ``conf/model/hf.yaml`` reads a model directory's config.json with."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if "train_schema.yaml" not in store.repo:  # once a process: building the node takes a sixth of a compose
        store.store(name="train_schema", node=TrainConfig)
    register_resolvers()


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("hf", hf_config_value, replace=True)
    OmegaConf.register_new_resolver("hf_is", hf_architecture_is, replace=True)


_MISSING = object()


def hf_config_value(path: str, keys: str, default: Any = _MISSING) -> Any:
    """``${hf:DIR,KEY|OTHER.KEY,DEFAULT}``: the first of ``keys`` (dotted paths) in ``DIR/config.json``."""
    data = hf_config(path)
    for key in keys.split("|"):
        value: Any = data
        for part in key.split("."):
            if isinstance(value, list) and part.isdigit():
                value = value[int(part)] if int(part) < len(value) else _MISSING
            else:
                value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is not _MISSING and value is not None:
            return value
    if default is _MISSING:
        raise ConfigError("model.path", path, f"its config.json has no {' or '.join(keys.split('|'))}")
    return default


def hf_architecture_is(path: str, architecture: str) -> bool:
    """``${hf_is:DIR,Qwen2ForCausalLM}``: whether config.json's architecture is this one."""
    return (hf_config(path).get("architectures") or [None])[0] == architecture


def hf_config(path: str) -> dict[str, Any]:
    """A Hugging Face model directory's ``config.json``, checked to be one."""
    import json

    file = Path(path) / "config.json"
    if not path:
        raise ConfigError("model.path", path, "required with model=hf: a Hugging Face model directory, model.path=DIR")
    if not Path(path).is_dir():
        raise ConfigError("model.path", path, "no such directory: a Hugging Face model directory (config.json, safetensors)")
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError("model.path", path, "has no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as error:
        raise ConfigError("model.path", path, f"its config.json cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError("model.path", path, "its config.json is not a JSON object")
    return data


def unknown_keys(data: Any, cls: Any = TrainConfig, prefix: str = "") -> list[str]:
    """Keys of ``data`` that the schema does not have (``+trainer.foo=1`` would otherwise be dropped)."""
    hints = typing_hints(cls)
    found = []
    for key, value in data.items():
        if key not in hints:
            found.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and hasattr(value, "items"):
            found += unknown_keys(value, hints[key], f"{prefix}{key}.")
    return found


@functools.cache
def structured_schema() -> Any:
    """``OmegaConf.structured(TrainConfig)``, built once a process (a deep copy costs a quarter of a build)."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(TrainConfig)


def to_config(node: Any) -> TrainConfig:
    """Convert a composed ``DictConfig`` (or a plain mapping) into a :class:`TrainConfig`.

    Raises:
        ConfigError: for a key the schema does not have, naming the valid keys of its section.
    """
    from omegaconf import OmegaConf

    register_resolvers()
    container: Any = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if unknown := unknown_keys({k: v for k, v in container.items() if k != "hydra"}):
        key = unknown[0]
        section = key.rpartition(".")[0]
        owner: Any = TrainConfig
        value: Any = container
        for part in section.split(".") if section else []:
            owner, value = typing_hints(owner)[part], value[part]
        valid = ", ".join(f.name for f in dataclasses.fields(owner))
        raise ConfigError(
            key, value[key.rpartition(".")[2]], f"unknown key; valid keys under '{section or 'the top level'}': {valid}"
        )
    merged = OmegaConf.merge(structured_schema(), node)  # merge copies its first argument
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, TrainConfig)
    return cfg


def foreign_keys(cfg: TrainConfig, keys: list[str]) -> None:
    """Refuse a key of ``strategy``, ``launcher`` or ``data`` that belongs to another option than the chosen one.

    ``keys`` are what the user set (``strategy.offload_optimizer``); an option's schema is its class's
    ``OPTIONS`` entry plus ``name``.

    Raises:
        ConfigError: naming the key, its value, the option it belongs to and the chosen option's keys.
    """
    for key in keys:
        section, _, name = key.partition(".")
        if section not in ("strategy", "launcher", "data") or not name or "." in name:
            continue
        node = getattr(cfg, section)
        options = type(node).OPTIONS
        own = options.get(node.name)
        if own is None or name == "name" or name in own:
            continue
        owners = [option for option, keys in options.items() if name in keys]
        if not owners:
            continue  # not a field at all: to_config names it as unknown
        valid = ", ".join(["name", *own])
        raise ConfigError(
            key,
            getattr(node, name),
            f"a key of {section}={'|'.join(owners)}, not of {section}={node.name}; the keys of {section}={node.name}: {valid}",
        )


def schema_type(key: str) -> Any:
    """The schema's type of a dotted key (``trainer.progress`` -> bool), or None if it has none."""
    owner: Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(owner):
            return None
        owner = typing_hints(owner).get(part)
    return owner


def typing_hints(cls: Any) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def to_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load(path: str | os.PathLike[str]) -> TrainConfig:
    """Load a resolved ``config.yaml`` written by :func:`to_yaml`."""
    from omegaconf import OmegaConf

    return to_config(OmegaConf.load(Path(path)))


def cache_root() -> Path:
    """Where fmtrain keeps what it can rebuild (tokenized data, the CPU peak probe): $FMTRAIN_CACHE."""
    return Path(os.path.expanduser(os.environ.get("FMTRAIN_CACHE", "~/.cache/fmtrain")))


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_data_paths(paths: list[str]) -> list[Path]:
    """Expand globs (``**`` included) into a sorted, de-duplicated list of files."""
    found: set[Path] = set()
    for pattern in paths:
        pattern = os.path.expanduser(pattern)
        matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
        found.update(Path(m).resolve() for m in matches if os.path.isfile(m))
        if os.path.isdir(pattern):
            found.update(p.resolve() for p in Path(pattern).rglob("*") if p.is_file())
    return sorted(found)


def micro_batch_size(t: TrainerConfig, world_size: int) -> int:
    """Sequences per rank per forward pass: as configured, or the global batch shared out."""
    return t.micro_batch_size or t.global_batch_size // world_size


def accumulation_steps(t: TrainerConfig, dp_size: int) -> int:
    """Micro-batches per rank per optimizer step."""
    return t.global_batch_size // (micro_batch_size(t, dp_size) * dp_size)
