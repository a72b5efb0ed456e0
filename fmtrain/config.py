"""The typed configuration of one fmtrain run.

The schema lives here as dataclasses; the values live in YAML groups under ``conf/``. Hydra merges
``schema <- YAML <- command line`` and the result is converted once, at the boundary, into these
objects (:func:`to_config`). Nothing deeper than the CLI and the worker entry point sees a
``DictConfig``.

This module imports neither torch nor Hydra at import time, so the CLI can validate a config before
paying for torch.

    >>> from fmtrain.config import TrainConfig, validate
    >>> validate(TrainConfig())  # raises ConfigError naming field, value and the valid choices
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    """A Llama-style decoder. ``name`` is informational; the numbers define the model."""

    name: str = "tiny"
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
    """How ranks share the work. Fields that a strategy does not use are ignored by it."""

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
    """Where the ranks start. Fields that a launcher does not use are ignored by it."""

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


# ----------------------------------------------------------------------------- validation

DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZER_IMPLEMENTATIONS = ("fused", "foreach", "for_loop")
ACTIVATION_CHECKPOINTING = ("none", "full", "every_n")
NONFINITE = ("error", "skip")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
STRATEGIES = ("ddp", "fsdp", "deepspeed", "tp", "fsdp_tp")
ZERO_STAGES = (1, 2, 3)
FP8_STRATEGIES = ("ddp", "fsdp")
LAUNCHERS = ("local", "slurm", "ray")
RAY_SUBMIT = ("foreground", "jobs")
TOKENIZERS = {"bytes": 256}


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, value, "must be " + ("non-negative" if zero_ok else "positive"))


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"valid choices are {', '.join(choices)}")


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


def validate(cfg: TrainConfig, *, gpus_available: int | None = None, world_size: int | None = None) -> None:
    """Refuse a config that cannot run, before anything is started.

    Args:
        cfg: the config to check.
        gpus_available: GPUs visible to the launcher; ``None`` means "not known here" (the nproc
            bound is then checked against CPU cores when the device is the CPU).
        world_size: check the plan for this many ranks instead of the launcher's (``fmtrain plan``);
            the bound of processes on this machine is then not checked.

    Raises:
        ConfigError: naming the field, the value and the valid choices.
    """
    m, d, o, t, c, lnch = cfg.model, cfg.data, cfg.optim, cfg.trainer, cfg.checkpoint, cfg.launcher
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
        _positive(f"model.{key}", getattr(m, key))
    if m.dim % m.n_heads:
        raise ConfigError("model.n_heads", m.n_heads, f"must divide model.dim={m.dim}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError("model.n_heads", m.n_heads, "head dim (dim/n_heads) must be even for rotary embeddings")
    n_kv = m.n_kv_heads or m.n_heads
    if n_kv <= 0 or m.n_heads % n_kv:
        raise ConfigError("model.n_kv_heads", m.n_kv_heads, f"must be positive and divide model.n_heads={m.n_heads}")
    _positive("model.ffn_dim_multiplier", m.ffn_dim_multiplier)
    _positive("model.norm_eps", m.norm_eps)

    _choice("data.tokenizer", d.tokenizer, tuple(TOKENIZERS))
    if m.vocab_size < TOKENIZERS[d.tokenizer]:
        raise ConfigError(
            "model.vocab_size",
            m.vocab_size,
            f"must be >= {TOKENIZERS[d.tokenizer]}, the vocabulary of data.tokenizer={d.tokenizer}",
        )
    _positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", d.val_fraction, "must be between 0 and 1 (exclusive)")
    _positive("data.max_bytes", d.max_bytes)
    _positive("data.shard_tokens", d.shard_tokens)
    if d.name != "stdlib" and not d.paths:
        raise ConfigError("data.paths", d.paths, "give one or more files, directories or globs, e.g. data.paths=[notes/*.txt]")
    if d.paths and not resolve_data_paths(d.paths):
        raise ConfigError("data.paths", d.paths, "no file matches; give existing files, directories or globs")

    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    _positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    _positive("optim.grad_clip", o.grad_clip, zero_ok=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", o.min_lr_ratio, "must be between 0 and 1")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError("optim.betas", list(o.betas), "each beta must be in [0, 1)")
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _choice("optim.implementation", o.implementation, OPTIMIZER_IMPLEMENTATIONS)

    for key in ("max_steps", "global_batch_size", "eval_interval", "eval_batches", "log_interval"):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.micro_batch_size is not None:
        _positive("trainer.micro_batch_size", t.micro_batch_size)
    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.activation_checkpointing", t.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    _positive("trainer.checkpoint_every_n", t.checkpoint_every_n)
    _choice("trainer.on_nonfinite", t.on_nonfinite, NONFINITE)
    if t.peak_flops is not None:
        _positive("trainer.peak_flops", t.peak_flops)
    if t.resume not in ("auto", "never") and not Path(t.resume).expanduser().is_dir():
        raise ConfigError("trainer.resume", t.resume, "must be auto, never, or an existing checkpoint directory")

    _positive("checkpoint.interval", c.interval)
    _positive("checkpoint.keep_last", c.keep_last)

    _choice("strategy.name", cfg.strategy.name, STRATEGIES)
    from fmtrain.parallel import ParallelDims

    if cfg.strategy.name == "deepspeed":
        _check_deepspeed(cfg)
    _choice("launcher.name", lnch.name, LAUNCHERS)
    if lnch.name == "slurm":
        _check_slurm(lnch)
    if lnch.name == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("launcher.name", "ray", "the ray package is not installed: pip install 'fmtrain[ray]'")
        _positive("launcher.num_workers", lnch.num_workers)
        _positive("launcher.cpus_per_worker", lnch.cpus_per_worker)
        _positive("launcher.gpus_per_worker", lnch.gpus_per_worker, zero_ok=True)
        _positive("launcher.max_failures", lnch.max_failures, zero_ok=True)
        _positive("launcher.object_store_mb", lnch.object_store_mb)
        _choice("launcher.submit", lnch.submit, RAY_SUBMIT)
        if lnch.submit == "jobs" and not lnch.address:
            raise ConfigError(
                "launcher.address",
                lnch.address,
                "launcher.submit=jobs needs the dashboard of the cluster, e.g. http://127.0.0.1:8265",
            )
    world = world_size or world_size_of(lnch)
    dims = ParallelDims.from_config(cfg.strategy, world)
    dims.check_model(m)
    if cfg.strategy.sequence_parallel:
        if cfg.strategy.name not in ("tp", "fsdp_tp"):
            raise ConfigError(
                "strategy.sequence_parallel",
                True,
                f"splits tensor-parallel activations: strategy=tp or fsdp_tp, not {cfg.strategy.name}",
            )
        if cfg.data.seq_len % dims.tp:
            raise ConfigError(
                "strategy.sequence_parallel",
                True,
                f"needs data.seq_len={cfg.data.seq_len} divisible by the tensor-parallel degree {dims.tp}",
            )
    _choice("precision.name", cfg.precision.name, PRECISIONS)
    _positive("launcher.nproc", lnch.nproc)
    _positive("launcher.max_restarts", lnch.max_restarts, zero_ok=True)
    _positive("launcher.shutdown_timeout", lnch.shutdown_timeout)
    _positive("launcher.monitor_interval", lnch.monitor_interval)
    if world_size is None:
        if lnch.name == "slurm":  # the job's nodes decide; the cluster check (sinfo) is the launcher's
            wants_gpu = t.device == "cuda" or (t.device == "auto" and lnch.gpus_per_node > 0)
        elif lnch.name == "ray":  # the cluster's resources are checked when Ray is up
            wants_gpu = t.device == "cuda" or (t.device == "auto" and lnch.gpus_per_worker > 0)
        else:
            wants_gpu = t.device == "cuda" or (t.device == "auto" and bool(gpus_available))
            if wants_gpu:
                limit, what = gpus_available or 0, "GPUs visible"
            else:
                limit, what = 4 * usable_cpus(), f"4 x the {usable_cpus()} usable CPU cores"
            if lnch.nproc > limit:
                raise ConfigError("launcher.nproc", lnch.nproc, f"must be <= {limit} ({what})")
        if lnch.name == "local":  # this machine's device runs it: ask it (Slurm and Ray nodes: each rank asks its own)
            from fmtrain.hardware import probe

            caps = probe("cuda" if wants_gpu else "cpu", engines=cfg.strategy.name == "deepspeed")
            if reason := caps.refusal(cfg.strategy.name, cfg.precision.name):
                raise ConfigError("precision.name", cfg.precision.name, reason)
        elif cfg.precision.name == "fp8" and not wants_gpu:
            raise ConfigError(
                "precision.name",
                "fp8",
                "fp8 training needs GPUs with fp8 tensor cores (compute capability >= 8.9, e.g. H100) and this run has "
                "no GPU: use bf16 or fp16",
            )
    if cfg.precision.name == "fp8":
        import importlib.util

        if cfg.strategy.name not in FP8_STRATEGIES:
            raise ConfigError(
                "precision.name", "fp8", f"fp8 (torchao Float8Linear) is supported with strategy={' or '.join(FP8_STRATEGIES)}"
            )
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("precision.name", "fp8", "fp8 needs the torchao package: pip install 'fmtrain[fp8]'")

    # Tensor-parallel peers share their data: the batch is split over the data-parallel ranks.
    micro = t.micro_batch_size or 1
    if t.global_batch_size % (micro * dims.dp):
        raise ConfigError(
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be divisible by trainer.micro_batch_size x data-parallel ranks = {micro} x {dims.dp} = {micro * dims.dp}",
        )


def _check_slurm(lnch: LauncherConfig) -> None:
    for key in ("nodes", "time_min", "signal_delay_s", "array_parallelism"):
        _positive(f"launcher.{key}", getattr(lnch, key))
    _positive("launcher.gpus_per_node", lnch.gpus_per_node, zero_ok=True)
    _positive("launcher.max_requeues", lnch.max_requeues, zero_ok=True)
    for key in ("tasks_per_node", "procs_per_task", "cpus_per_task", "mem_gb"):
        if getattr(lnch, key) is not None:
            _positive(f"launcher.{key}", getattr(lnch, key))
    if lnch.gpus_per_node and tasks_per_node(lnch) not in (1, lnch.gpus_per_node):
        raise ConfigError(
            "launcher.tasks_per_node",
            lnch.tasks_per_node,
            f"must be launcher.gpus_per_node={lnch.gpus_per_node} (one task per GPU) or 1 (one task per node)",
        )
    if procs_per_task(lnch) > 1 and tasks_per_node(lnch) != 1:
        raise ConfigError(
            "launcher.procs_per_task",
            procs_per_task(lnch),
            f"several ranks per task needs one task per node: launcher.tasks_per_node=1, not {tasks_per_node(lnch)}",
        )
    if lnch.signal_delay_s >= lnch.time_min * 60:
        raise ConfigError(
            "launcher.signal_delay_s",
            lnch.signal_delay_s,
            f"must be shorter than the time limit launcher.time_min={lnch.time_min} minutes",
        )


def _check_deepspeed(cfg: TrainConfig) -> None:
    import importlib.util

    s = cfg.strategy
    if s.zero_stage not in ZERO_STAGES:
        raise ConfigError("strategy.zero_stage", s.zero_stage, "valid choices are 1, 2, 3")
    if s.offload_params and s.zero_stage != 3:
        raise ConfigError("strategy.offload_params", True, f"parameter offload needs strategy.zero_stage=3, not {s.zero_stage}")
    if cfg.trainer.on_nonfinite == "skip" and cfg.precision.name != "fp16":
        raise ConfigError(
            "trainer.on_nonfinite",
            "skip",
            "strategy=deepspeed steps inside its engine and skips only fp16 overflows; use error (the default), "
            "precision=fp16, or another strategy",
        )
    reserved = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler"}
    if clash := sorted(reserved & set(s.deepspeed)):
        raise ConfigError(
            "strategy.deepspeed",
            clash,
            "these keys come from trainer.global_batch_size/micro_batch_size and optim.*; set those instead",
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "strategy.name", "deepspeed", "the deepspeed package is not installed: pip install 'fmtrain[deepspeed]'"
        )


def micro_batch_size(t: TrainerConfig, world_size: int) -> int:
    """Sequences per rank per forward pass: as configured, or the global batch shared out."""
    return t.micro_batch_size or t.global_batch_size // world_size


def accumulation_steps(t: TrainerConfig, dp_size: int) -> int:
    """Micro-batches per rank per optimizer step."""
    return t.global_batch_size // (micro_batch_size(t, dp_size) * dp_size)
