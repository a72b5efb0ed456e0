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

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config value that fmtrain refuses, with the field, the value and what would be valid."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r} is invalid: {expected}")

    def __reduce__(self) -> tuple[type, tuple[str, object, str]]:
        # Rebuilt from its fields when it crosses a process (a Ray Tune trial's error reaches the driver).
        return type(self), (self.key, self.value, self.expected)


@dataclass
class ModelConfig:
    """A decoder's sizes. ``arch`` picks the architecture (``fmtrain.models``' registry: ``llama``, or a
    model of your own); ``name`` is informational; the numbers define the model."""

    name: str = "tiny"
    arch: str = "llama"
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 256
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class DataConfig:
    """Text files tokenized once into cached memmap shards.

    ``paths`` empty means the default corpus: the Python standard library's own source files, which
    every machine with Python has, so nothing is downloaded.
    """

    name: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    tokenizer: str = "bytes"
    seq_len: int = 256
    val_fraction: float = 0.02
    max_bytes: int = 64_000_000
    shard_tokens: int = 16_000_000
    cache_dir: str = ""  # "" = cache_root()/data: $FMTRAIN_CACHE/data, else ~/.cache/fmtrain/data


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on matrices only, warmup then a decay schedule."""

    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    grad_clip: float = 1.0
    # torch's AdamW kernels, as torchtitan names them: "fused" (one kernel for the whole update; CPU
    # and CUDA; 12 -> 4 ms per step for the tiny model on one core), "foreach" (torch's default),
    # "for_loop" (one parameter at a time: the least temporary memory).
    implementation: str = "fused"


@dataclass
class TrainerConfig:
    max_steps: int = 120
    global_batch_size: int = 16
    micro_batch_size: int | None = None  # None: global_batch_size / world size (no accumulation)
    eval_interval: int = 40
    eval_batches: int = 4
    log_interval: int = 10
    resume: str = "auto"
    on_nonfinite: str = "error"
    peak_flops: float | None = None
    device: str = "auto"
    activation_checkpointing: str = "none"  # none | full | every_n
    checkpoint_every_n: int = 2  # with every_n: blocks 0, n, 2n, ... recompute their activations
    compile: bool = False  # torch.compile each transformer block
    progress: bool = True
    plot: bool = True


@dataclass
class CheckpointConfig:
    interval: int = 40
    keep_last: int = 2
    keep_best: bool = True


@dataclass
class StrategyConfig:
    """How ranks share the work. Each option's own keys are in ``OPTIONS``: a key of another option
    is refused (:func:`foreign_keys`), so ``strategy=fsdp strategy.offload_optimizer=true`` is an error."""

    OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "ddp": ("find_unused_parameters", "bucket_cap_mb"),
        "fsdp": ("reshard_after_forward", "cpu_offload"),
        "deepspeed": ("zero_stage", "offload_optimizer", "offload_params", "zero_init", "deepspeed"),
        "tp": ("tp", "sequence_parallel"),
        "fsdp_tp": ("tp", "sequence_parallel", "reshard_after_forward", "cpu_offload"),
    }

    name: str = "ddp"
    tp: int | None = None  # tensor-parallel degree (tp, fsdp_tp); None: the world size for tp
    # tp, fsdp_tp: norms and the residual stream split along the sequence between the projections
    # (Megatron's sequence parallelism): activations 1/tp, all-reduces become reduce-scatter + all-gather
    sequence_parallel: bool = False
    reshard_after_forward: bool = True  # fsdp, fsdp_tp: free gathered parameters after forward
    cpu_offload: bool = False  # fsdp, fsdp_tp: keep parameters, gradients and optimizer state on CPU
    find_unused_parameters: bool = False  # ddp
    bucket_cap_mb: int = 25  # ddp
    zero_stage: int = 2  # deepspeed: 1 optimizer state, 2 + gradients, 3 + parameters partitioned
    offload_optimizer: bool = False  # deepspeed: optimizer state and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # deepspeed stage 3: parameters on the CPU between uses
    # deepspeed stage 3: build the model inside deepspeed.zero.Init, each layer partitioned as it is
    # made, so no rank ever holds the whole model (false: materialize it on every rank, then partition)
    zero_init: bool = True
    deepspeed: dict[str, Any] = field(default_factory=dict)  # deepspeed: extra JSON keys, merged over fmtrain's


@dataclass
class PrecisionConfig:
    name: str = "fp32"


@dataclass
class LauncherConfig:
    """Where the ranks start. Each option's own keys are in ``OPTIONS``: a key of another option is
    refused (:func:`foreign_keys`), so ``launcher=local launcher.partition=gpu`` is an error."""

    OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "local": ("nproc", "max_restarts", "shutdown_timeout", "monitor_interval"),
        "slurm": (
            "nodes", "tasks_per_node", "procs_per_task", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min",
            "partition", "account", "qos", "constraint", "exclude", "job_name", "sbatch", "setup", "signal_delay_s",
            "max_requeues", "array_parallelism", "env_allow", "code_snapshot",
        ),
        "ray": ("address", "num_workers", "cpus_per_worker", "gpus_per_worker", "max_failures", "object_store_mb", "submit"),
    }  # fmt: skip

    name: str = "local"
    # local: processes on this machine under torch's elastic agent
    nproc: int = 1
    max_restarts: int = 0
    shutdown_timeout: int = 30
    monitor_interval: float = 0.1
    # slurm: sbatch through submitit (see conf/launcher/slurm.yaml and conf/cluster/)
    nodes: int = 1
    tasks_per_node: int | None = None  # None: gpus_per_node when > 0 (one task per GPU), else 1
    procs_per_task: int | None = (
        None  # ranks each task starts (one task per node): None = 1, or gpus_per_node with tasks_per_node=1
    )
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # None: Slurm's default (1)
    mem_gb: float | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    job_name: str = "fmtrain"
    sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch flags: {reservation: x, exclusive: true}
    setup: list[str] = field(default_factory=list)  # shell lines before the job runs (module load, exports)
    signal_delay_s: int = 120  # USR2 this long before the time limit: save, requeue, resume
    max_requeues: int = 3  # preemptions/time limits survived, then the job ends "stopped"
    array_parallelism: int = 16  # -m sweeps: tasks of the job array running at once
    env_allow: list[str] = field(default_factory=list)  # secret-looking variables to pass to the job anyway
    code_snapshot: bool = True  # jobs run a copy of fmtrain taken at submission
    # ray: Ray Train (TorchTrainer) workers on a Ray cluster
    address: str | None = None  # None: start a local Ray for this run; "auto"; or the cluster's host:port
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0  # worker-group restarts, each resuming from the newest checkpoint
    object_store_mb: int = 256  # the local Ray's object store (fmtrain moves no data through it)
    submit: str = "foreground"  # "jobs": submit through the Ray Jobs API (address = the dashboard's URL) and return its id


def world_size_of(launcher: LauncherConfig) -> int:
    """How many ranks a launcher starts."""
    if launcher.name == "slurm":
        return launcher.nodes * tasks_per_node(launcher) * procs_per_task(launcher)
    if launcher.name == "ray":
        return launcher.num_workers
    return launcher.nproc


def procs_per_task(launcher: LauncherConfig) -> int:
    """Ranks per Slurm task: 1 (Slurm starts every rank), or one task per node starting them all."""
    if launcher.procs_per_task is not None:
        return launcher.procs_per_task
    return launcher.gpus_per_node if launcher.tasks_per_node == 1 and launcher.gpus_per_node > 1 else 1


def tasks_per_node(launcher: LauncherConfig) -> int:
    """One task per GPU (Slurm starts every rank) unless said otherwise; on CPU one per node."""
    if launcher.tasks_per_node is not None:
        return launcher.tasks_per_node
    return launcher.gpus_per_node or 1


@dataclass
class TuneConfig:
    """``fmtrain tune``: a Ray Tune search over the same config; every trial is an fmtrain run.

    ``space`` maps a config key to a distribution: ``loguniform(1e-4, 1e-2)``, ``uniform(0.0, 0.2)``,
    ``randint(2, 8)``, ``choice([2, 4])`` or ``grid([1e-3, 3e-3])`` (tried exhaustively).
    """

    name: str = "none"
    scheduler: str = "asha"  # asha (stop bad trials early) | pbt (exploit good trials' checkpoints) | fifo
    search: str = "random"  # random | grid | optuna
    num_samples: int = 8
    metric: str = "val_loss"
    mode: str = "min"
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0  # per rank: a trial of launcher.nproc=N ranks takes N x this (Slurm trials: see launcher)
    grace_period: int = 1  # asha: evaluations before a trial may be stopped
    reduction_factor: int = 3  # asha: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 2  # pbt: evaluations between exploit/explore decisions
    # pbt: decide when every trial has reached the interval (reproducible from the seed); false: as each
    # arrives (no trial waits for the slowest, but which trials are compared depends on timing)
    synch: bool = True
    space: dict[str, Any] = field(default_factory=dict)  # nested keys allowed: {optim: {lr: "..."}}
    resume: bool = False  # continue an interrupted sweep in run_dir; finished trials are not rerun
    address: str | None = None  # the Ray cluster for the trials; None starts a local Ray


@dataclass
class TrainConfig:
    experiment: str = "default"
    run_dir: str = "outputs/default/run"
    seed: int = 1337
    # Modules every process of the run imports first: where your own models register themselves
    # (fmtrain.models.register), e.g. imports=[my_models]; they must be importable on every node.
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def register_schema() -> None:
    """Register the schema in Hydra's ConfigStore as ``train_schema`` (the first default)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


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


def to_config(node: Any) -> TrainConfig:
    """Convert a composed ``DictConfig`` (or a plain mapping) into a :class:`TrainConfig`.

    Raises:
        ConfigError: for a key the schema does not have, naming the valid keys of its section.
    """
    from omegaconf import OmegaConf

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
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), node)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, TrainConfig)
    return cfg


def foreign_keys(cfg: TrainConfig, keys: list[str]) -> None:
    """Refuse a key of ``strategy`` or ``launcher`` that belongs to another option than the chosen one.

    ``keys`` are what the user set (``strategy.offload_optimizer``); an option's schema is its class's
    ``OPTIONS`` entry plus ``name``.

    Raises:
        ConfigError: naming the key, its value, the option it belongs to and the chosen option's keys.
    """
    for key in keys:
        section, _, name = key.partition(".")
        if section not in ("strategy", "launcher") or not name or "." in name:
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
