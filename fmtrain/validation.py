"""Cross-field checks of a run's config: everything that can be refused before anything starts.

    from fmtrain.validation import validate
    validate(cfg)                       # raises ConfigError naming the field, the value and what is valid
    validate(cfg, world_size=4096)      # a plan for that many ranks (fmtrain plan): no local bounds

The schema (``fmtrain.config``) knows types; this module knows what combinations can run: positive
sizes, divisibility of heads and batches by the parallel degrees (:mod:`fmtrain.parallel`), what this
machine's device can train (:mod:`fmtrain.hardware`), the launcher's own fields.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from fmtrain import hardware, models, pretrained
from fmtrain.config import (
    ConfigError,
    DataConfig,
    LauncherConfig,
    TrainConfig,
    check_domains,
    procs_per_task,
    resolve_data_paths,
    tasks_per_node,
    usable_cpus,
    world_size_of,
)
from fmtrain.parallel import TENSOR_PARALLEL, ParallelDims
from fmtrain.sources import SOURCES, mix_components, source_of
from fmtrain.tokenizer import tokenizer_of

DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZER_IMPLEMENTATIONS = ("fused", "foreach", "for_loop")
ACTIVATION_CHECKPOINTING = ("none", "full", "every_n")
NONFINITE = ("error", "skip")
COMPILE = ("auto", "true", "false")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")
STRATEGIES = ("ddp", "fsdp", "deepspeed", "tp", "fsdp_tp")
ZERO_STAGES = (1, 2, 3)
FP8_STRATEGIES = ("ddp", "fsdp")
LAUNCHERS = ("local", "slurm", "ray")
RAY_SUBMIT = ("foreground", "jobs")


RAY_ADDRESS = re.compile(r"(ray://)?[\w.-]+:\d{1,5}")
DASHBOARD = re.compile(r"https?://[\w.-]+(:\d{1,5})?/?")


def check_ray_address(key: str, address: str | None, *, dashboard: bool = False) -> None:
    """A Ray cluster's address as Ray takes it: auto, host:port, ray://host:port; with the Jobs API,
    the dashboard's http://host:port."""
    if address is None or address == "auto":
        return
    form = DASHBOARD if dashboard else RAY_ADDRESS
    if not form.fullmatch(address):
        valid = "the dashboard's URL, e.g. http://head:8265" if dashboard else "auto, HOST:PORT or ray://HOST:PORT"
        raise ConfigError(key, address, f"not a Ray address: {valid}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"valid choices are {', '.join(choices)}")


def validate_data(d: DataConfig) -> None:
    """The data source: its name, its paths, and what :meth:`Source.check` finds in them (columns,
    splits, token files), before anything starts."""
    _choice("data.name", d.name, tuple(SOURCES))
    if d.chat_template not in ("auto", "chatml") and not Path(d.chat_template).expanduser().is_file():
        raise ConfigError("data.chat_template", d.chat_template, "must be auto, chatml or a Jinja template file")
    if d.name == "mix":  # each entry a source of its own, with the run's data.packing
        for component, _ in mix_components(d):
            validate_data(component)
        return
    if d.packing != "concat" and d.name not in ("jsonl", "parquet", "hf_disk"):
        raise ConfigError(
            "data.packing", d.packing, f"reads examples from records: data=jsonl, parquet or hf_disk, not data={d.name}"
        )
    if d.name != "stdlib" and not d.paths:
        raise ConfigError("data.paths", d.paths, "give one or more files, directories or globs, e.g. data.paths=[notes/*.txt]")
    for pattern in d.paths:  # each one: a glob that matches nothing is a typo, even beside one that matches
        if not resolve_data_paths([pattern]):
            raise ConfigError("data.paths", pattern, "no file matches; give existing files, directories or globs")
    source_of(d).check()


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
    check_domains(cfg)  # each field on its own: type, range, finiteness, non-empty, choices
    m, d, o, t, lnch = cfg.model, cfg.data, cfg.optim, cfg.trainer, cfg.launcher
    if m.head_dim is None and m.dim % m.n_heads:
        raise ConfigError("model.n_heads", m.n_heads, f"must divide model.dim={m.dim}")
    models.import_modules(cfg.imports)  # a user's own model registers itself on import
    spec = models.get(m.arch)
    spec.check(m)  # what this architecture cannot build (Llama: odd rotary head dims, kv heads)
    if d.packing == "bfd" and not spec.takes_packed(m):
        raise ConfigError("data.packing", "bfd", f"model.arch={m.arch} takes no position or example ids; use data.packing=none")
    if d.packing == "bfd" and cfg.strategy.sequence_parallel:
        raise ConfigError("strategy.sequence_parallel", True, "is not built for packed examples (data.packing=bfd) yet")
    if t.freeze:
        from fmtrain.models.converters import check_freeze

        check_freeze(cfg, models.recipe(cfg).meta())
    pretrained.check(cfg)  # trainer.init_from / model.path: the files, the architecture, every tensor

    tokenizer = tokenizer_of(cfg)  # data.tokenizer: bytes, a tokenizer.json or a SentencePiece tokenizer.model
    if m.vocab_size < tokenizer.vocab_size:
        what = "the byte tokenizer" if tokenizer.file is None else str(tokenizer.file)
        raise ConfigError(
            "model.vocab_size",
            m.vocab_size,
            f"must be >= {tokenizer.vocab_size}, the vocabulary of {what} (data.tokenizer={d.tokenizer}): "
            "each token needs a row of the embedding",
        )
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    validate_data(d)

    _choice("optim.schedule", o.schedule, SCHEDULES)
    _choice("optim.implementation", o.implementation, OPTIMIZER_IMPLEMENTATIONS)

    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.activation_checkpointing", t.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    _choice("trainer.on_nonfinite", t.on_nonfinite, NONFINITE)
    _choice("trainer.compile", t.compile, COMPILE)
    if t.compile == "auto":
        hardware.compile_pin()  # a bad $FMTRAIN_COMPILE_AUTO is refused here, not on every rank
    if 0 < t.hang_timeout_s < 5:  # the watchdog looks once a second
        raise ConfigError("trainer.hang_timeout_s", t.hang_timeout_s, "must be 0 (no watchdog) or at least 5 seconds")
    if t.resume not in ("auto", "never") and not Path(t.resume).expanduser().is_dir():
        raise ConfigError("trainer.resume", t.resume, "must be auto, never, or an existing checkpoint directory")

    _choice("strategy.name", cfg.strategy.name, STRATEGIES)
    if cfg.strategy.name == "deepspeed":
        _check_deepspeed(cfg)
    _choice("launcher.name", lnch.name, LAUNCHERS)
    if lnch.name == "slurm":
        _check_slurm(lnch)
    if lnch.name == "ray":
        if importlib.util.find_spec("ray") is None:
            raise ConfigError("launcher.name", "ray", "the ray package is not installed: pip install 'fmtrain[ray]'")
        _choice("launcher.submit", lnch.submit, RAY_SUBMIT)
        check_ray_address("launcher.address", lnch.address, dashboard=lnch.submit == "jobs")
        if lnch.submit == "jobs" and not lnch.address:
            raise ConfigError(
                "launcher.address",
                lnch.address,
                "launcher.submit=jobs needs the dashboard of the cluster, e.g. http://127.0.0.1:8265",
            )
    check_ray_address("tune.address", cfg.tune.address)  # fmtrain tune's own cluster
    world = world_size or world_size_of(lnch)
    dims = ParallelDims.from_config(cfg.strategy, world)
    if cfg.strategy.name in TENSOR_PARALLEL:
        spec.check_tensor_parallel(m, cfg.strategy.name, dims.tp, cfg.strategy.sequence_parallel)
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
            hardware.check("cuda" if wants_gpu else "cpu", cfg.strategy.name, cfg.precision.name)
            if wants_gpu and lnch.start == "fork":
                raise ConfigError(
                    "launcher.start",
                    lnch.start,
                    "ranks on GPUs start as fresh processes (launcher.start=exec or auto): CUDA cannot run in a "
                    "process forked from one that initialized it",
                )
        elif cfg.precision.name == "fp8" and not wants_gpu:
            raise ConfigError(
                "precision.name",
                "fp8",
                "fp8 training needs GPUs with fp8 tensor cores (compute capability >= 8.9, e.g. H100) and this run has "
                "no GPU: use bf16 or fp16",
            )
    if cfg.precision.name == "fp8":
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
