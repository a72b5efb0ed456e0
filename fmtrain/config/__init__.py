"""The typed configuration of one fmtrain run.

The schema lives here as dataclasses; the values live in YAML groups under ``conf/``. Hydra merges
``schema <- YAML <- command line`` and the result is converted once, at the boundary, into these
objects (:func:`to_config`). Nothing deeper than the CLI and the worker entry point sees a
``DictConfig``.

This module imports neither torch nor Hydra at import time, nor any other module of fmtrain: it is the
bottom layer. What combinations of values can run is :mod:`fmtrain.validation`'s to say.

    >>> from fmtrain.config import TrainConfig
    >>> from fmtrain.validation import validate
    >>> validate(TrainConfig())  # raises ConfigError naming field, value and the valid choices
"""

from fmtrain.config.domains import ConfigError, Domain, check_domains, field_in
from fmtrain.config.io import (
    accumulation_steps,
    cache_root,
    foreign_keys,
    load,
    micro_batch_size,
    register_schema,
    resolve_data_paths,
    schema_type,
    to_config,
    to_yaml,
    typing_hints,
    unknown_keys,
    usable_cpus,
)
from fmtrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    LauncherConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    StrategyConfig,
    TrainConfig,
    TrainerConfig,
    TuneConfig,
    procs_per_task,
    slurm_world_size,
    tasks_per_node,
    world_size_of,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "Domain",
    "LauncherConfig",
    "ModelConfig",
    "OptimConfig",
    "PrecisionConfig",
    "StrategyConfig",
    "TrainConfig",
    "TrainerConfig",
    "TuneConfig",
    "accumulation_steps",
    "cache_root",
    "check_domains",
    "field_in",
    "foreign_keys",
    "load",
    "micro_batch_size",
    "procs_per_task",
    "register_schema",
    "resolve_data_paths",
    "schema_type",
    "slurm_world_size",
    "tasks_per_node",
    "to_config",
    "to_yaml",
    "typing_hints",
    "unknown_keys",
    "usable_cpus",
    "world_size_of",
]
