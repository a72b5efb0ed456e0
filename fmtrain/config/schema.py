"""The schema: one dataclass per section of a run's config, each field with its domain."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fmtrain.config.domains import Domain, field_in


@dataclass
class ModelConfig:
    """A decoder's sizes. ``arch`` picks the architecture (``fmtrain.models``' registry: ``llama``, or a
    model of your own); ``name`` is informational; the numbers define the model."""

    name: str = "tiny"
    arch: str = field_in("llama", nonempty=True)
    dim: int = field_in(256, gt=0, le=2**17)
    n_layers: int = field_in(4, gt=0, le=4096)
    n_heads: int = field_in(4, gt=0, le=4096)
    n_kv_heads: int | None = field_in(None, gt=0, le=4096)
    vocab_size: int = field_in(256, gt=0, le=2**24)
    ffn_dim_multiplier: float = field_in(1.0, ge=0.01, le=64)
    multiple_of: int = field_in(64, gt=0, le=2**16)
    norm_eps: float = field_in(1e-5, gt=0, le=1)
    rope_theta: float = field_in(10000.0, gt=1, le=1e12)
    max_seq_len: int = field_in(2048, gt=0, le=2**22)
    tie_embeddings: bool = True
    init_std: float = field_in(0.02, gt=0, le=1)
    ffn_dim: int | None = field_in(None, gt=0, le=2**20)  # the SwiGLU hidden size; None: from dim (Llama's rule)
    head_dim: int | None = field_in(None, gt=0, le=2**12)  # None: dim / n_heads (Qwen3 sets its own)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before the rotation (Qwen3)
    # Rotary frequencies: default (theta only), or llama3 (Llama 3.1+: long wavelengths divided by rope_factor,
    # a smooth blend between rope_low_freq_factor and rope_high_freq_factor, for rope_original_max_seq_len)
    rope_type: str = field_in("default", choices=("default", "llama3"))
    rope_factor: float = field_in(8.0, ge=1, le=1024)
    rope_low_freq_factor: float = field_in(1.0, gt=0, le=1024)
    rope_high_freq_factor: float = field_in(4.0, gt=0, le=1024)
    rope_original_max_seq_len: int = field_in(8192, gt=0, le=2**22)
    # The Hugging Face class an export hands back (model=hf: the source's); "": the one the features imply
    hf_architecture: str = ""
    # A Hugging Face model directory (config.json, safetensors): model=hf reads the sizes above from its
    # config.json, and the run starts from its weights (unless trainer.init_from names others).
    path: str = field_in("", path=True)
    # model=custom: the callable that builds your nn.Module (package.module.builder), and its keyword arguments
    target: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    # model=hf_auto: run the Python code a model directory names (auto_map in its config.json)
    trust_remote_code: bool = False
    # read pickle weights (pytorch_model.bin; torch.load with weights_only) where a directory has no safetensors
    allow_pickle: bool = False


@dataclass
class DataConfig:
    """A source of text (or of token ids) tokenized once into cached memmap shards (:mod:`fmtrain.sources`).

    ``name`` is the source: ``stdlib`` (the default corpus: the Python standard library's own source
    files, which every machine with Python has, so nothing is downloaded), ``text_files``, ``jsonl``,
    ``parquet``, ``hf_disk`` (a folder ``datasets``' ``save_to_disk`` wrote), ``tokens`` (ids already
    made, nanoGPT's ``.bin``), ``mix`` (several of these, weighted). Each option's own keys are in ``OPTIONS``.
    """

    OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "stdlib": (),
        "text_files": (),
        "jsonl": ("text_field",),
        "parquet": ("text_field",),
        "hf_disk": ("text_field", "split"),
        "tokens": ("dtype",),
        "mix": ("mix",),
    }

    name: str = field_in("stdlib", nonempty=True)
    paths: list[str] = field_in(list, items=Domain(nonempty=True, path=True))
    text_field: str = field_in("text", nonempty=True)  # jsonl, parquet, hf_disk: the field or column holding the text
    split: str = field_in("train", nonempty=True)  # hf_disk: the split of a saved DatasetDict
    dtype: str = field_in("uint16", choices=("uint8", "uint16", "uint32", "int32", "int64"))  # tokens: a .bin file's ids
    # a record that is not JSON, lacks the field, is empty or not text: error (name it and stop) or skip (count it)
    on_bad_record: str = field_in("error", choices=("error", "skip"))
    # concat: documents joined and cut into windows (pretraining); none: each record one example, padded
    # to seq_len, pad tokens out of the loss (fine-tuning: records with prompt and completion, or messages);
    # bfd: whole examples packed into rows best-fit-decreasing, positions restarting and attention within each
    packing: str = field_in("concat", choices=("concat", "none", "bfd"))
    train_on_prompt: bool = False  # examples: the prompt's (non-assistant) tokens count in the loss too
    overlong: str = field_in("truncate", choices=("truncate", "drop"))  # examples longer than seq_len + 1 tokens
    # messages: auto (the tokenizer folder's chat_template, else chatml), chatml, or a Jinja file
    chat_template: str = field_in("auto", nonempty=True, path=True)
    # mix: sources, each its own data settings (name, paths, text_field, ...) and a weight, e.g.
    # [{name: jsonl, paths: [a.jsonl], weight: 3}, {name: text_files, paths: [notes], weight: 1}]
    mix: list[dict[str, Any]] = field(default_factory=list)
    # bytes; auto: model.path's tokenizer.json when it has one, else bytes; or a tokenizer.json (or its folder)
    tokenizer: str = field_in("auto", nonempty=True, path=True)
    seq_len: int = field_in(256, gt=0, le=2**22)
    val_fraction: float = field_in(0.02, gt=0, lt=1)
    max_bytes: int = field_in(64_000_000, gt=0, le=2**50)
    shard_tokens: int = field_in(16_000_000, gt=0, le=2**40)
    # processes tokenizing while the cache is built (1: this one, with the tokenizer's own threads);
    # the shards are the same bytes whatever the number, so it is not part of the cache key
    num_workers: int = field_in(1, gt=0, le=256)
    cache_dir: str = field_in("", path=True)  # "" = cache_root()/data: $FMTRAIN_CACHE/data, else ~/.cache/fmtrain/data


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on matrices only, warmup then a decay schedule."""

    name: str = field_in("adamw", choices=("adamw",))
    lr: float = field_in(3e-3, gt=0, le=10)
    min_lr_ratio: float = field_in(0.1, ge=0, le=1)
    betas: tuple[float, float] = field_in((0.9, 0.95), length=2, items=Domain(ge=0, lt=1))
    eps: float = field_in(1e-8, gt=0, le=1)
    weight_decay: float = field_in(0.1, ge=0, le=10)
    warmup_steps: int = field_in(10, ge=0, le=2**40)
    schedule: str = "cosine"
    grad_clip: float = field_in(1.0, ge=0, le=1e6)
    # torch's AdamW kernels, as torchtitan names them: "fused" (one kernel for the whole update; CPU
    # and CUDA; 12 -> 4 ms per step for the tiny model on one core), "foreach" (torch's default),
    # "for_loop" (one parameter at a time: the least temporary memory).
    implementation: str = "fused"


@dataclass
class TrainerConfig:
    max_steps: int = field_in(120, gt=0, le=2**40)
    global_batch_size: int = field_in(16, gt=0, le=2**24)
    micro_batch_size: int | None = field_in(None, gt=0, le=2**24)  # None: global_batch_size / world size (no accumulation)
    eval_interval: int = field_in(40, gt=0, le=2**40)
    eval_batches: int = field_in(4, gt=0, le=2**20)
    log_interval: int = field_in(10, gt=0, le=2**40)
    resume: str = field_in("auto", nonempty=True, path=True)
    # Start from these weights only (fresh optimizer, step 0): a Hugging Face model directory or an
    # fmtrain checkpoint (any strategy, any world size). "": model.path's weights, else a random init.
    # Checkpoints of this run still come first (trainer.resume): an interrupted fine-tune resumes.
    init_from: str = field_in("", path=True)
    # parameters to keep fixed (out of the optimizer): shell patterns over the model's parameter
    # names, e.g. trainer.freeze=[tok_embeddings.weight,'blocks.[0-3].*']; each must match one
    freeze: list[str] = field_in(list, items=Domain(nonempty=True))
    on_nonfinite: str = "error"
    # a step, evaluation or save that makes no progress this long ends the job, naming the ranks that did
    # not arrive and writing every rank's Python stack to logs/ (the process group's timeout is a minute
    # longer); 0: no watchdog
    hang_timeout_s: float = field_in(1800.0, ge=0, le=7 * 86400)
    peak_flops: float | None = field_in(None, ge=1e6, le=1e20)
    device: str = "auto"
    activation_checkpointing: str = "none"  # none | full | every_n
    checkpoint_every_n: int = field_in(2, gt=0, le=4096)  # with every_n: blocks 0, n, 2n, ... recompute their activations
    # torch.compile each transformer block: true | false | auto (on a GPU, when the run's estimated compute
    # is long enough to pay for compiling, for architectures that compile cleanly; eager on a CPU:
    # fmtrain.step.resolve_compile)
    compile: str = "auto"
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        # trainer.compile=true arrives as the bool True (or "True" through a str field): one spelling
        self.compile = str(self.compile).lower()


@dataclass
class CheckpointConfig:
    interval: int = field_in(40, gt=0, le=2**40)
    keep_last: int = field_in(2, gt=0, le=10**6)
    keep_best: bool = True
    # checkpoint.async=true on the command line: the step goes on while the files are written in the
    # background (DCP's async save from a copy of the state); the manifest and rename come when every
    # rank's write has finished, so a crash meanwhile leaves the previous checkpoint the newest valid one
    async_save: bool = False


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
    tp: int | None = field_in(None, gt=0, le=4096)  # tensor-parallel degree (tp, fsdp_tp); None: the world size for tp
    # tp, fsdp_tp: norms and the residual stream split along the sequence between the projections
    # (Megatron's sequence parallelism): activations 1/tp, all-reduces become reduce-scatter + all-gather
    sequence_parallel: bool = False
    reshard_after_forward: bool = True  # fsdp, fsdp_tp: free gathered parameters after forward
    cpu_offload: bool = False  # fsdp, fsdp_tp: keep parameters, gradients and optimizer state on CPU
    find_unused_parameters: bool = False  # ddp
    bucket_cap_mb: int = field_in(25, gt=0, le=2**16)  # ddp
    zero_stage: int = 2  # deepspeed: 1 optimizer state, 2 + gradients, 3 + parameters partitioned
    offload_optimizer: bool = False  # deepspeed: optimizer state and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # deepspeed stage 3: parameters on the CPU between uses
    # deepspeed stage 3: build the model inside deepspeed.zero.Init, each layer partitioned as it is
    # made, so no rank ever holds the whole model (false: materialize it on every rank, then partition)
    zero_init: bool = True
    deepspeed: dict[str, Any] = field(default_factory=dict)  # deepspeed: extra JSON keys, merged over fmtrain's


@dataclass
class PrecisionConfig:
    name: str = "auto"  # bf16 where the device multiplies bf16 natively, else fp32 (hardware.resolve_precision)


@dataclass
class LauncherConfig:
    """Where the ranks start. Each option's own keys are in ``OPTIONS``: a key of another option is
    refused (:func:`foreign_keys`), so ``launcher=local launcher.partition=gpu`` is an error."""

    OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "local": ("nproc", "max_restarts", "shutdown_timeout", "monitor_interval", "start"),
        "slurm": (
            "nodes", "tasks_per_node", "procs_per_task", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min",
            "partition", "account", "qos", "constraint", "exclude", "job_name", "sbatch", "setup", "signal_delay_s",
            "max_requeues", "array_parallelism", "env_allow", "code_snapshot",
        ),
        "ray": ("address", "num_workers", "cpus_per_worker", "gpus_per_worker", "max_failures", "object_store_mb", "submit"),
    }  # fmt: skip

    name: str = "local"
    # local: processes on this machine under torch's elastic agent
    nproc: int = field_in(1, gt=0, le=4096)
    max_restarts: int = field_in(0, ge=0, le=1000)
    shutdown_timeout: int = field_in(30, gt=0, le=86400)
    monitor_interval: float = field_in(0.1, gt=0, le=3600)
    # how each rank's process starts: fork (from the launcher, which already imported torch: seconds sooner),
    # exec (a fresh interpreter, as torchrun starts them); auto: fork on CPUs, exec where ranks use GPUs
    start: str = field_in("auto", choices=("auto", "fork", "exec"))
    # slurm: sbatch through submitit (see conf/launcher/slurm.yaml and conf/cluster/)
    nodes: int = field_in(1, gt=0, le=10**5)
    # None: gpus_per_node when > 0 (one task per GPU), else 1
    tasks_per_node: int | None = field_in(None, gt=0, le=1024)
    # ranks each task starts (one task per node): None = 1, or gpus_per_node with tasks_per_node=1
    procs_per_task: int | None = field_in(None, gt=0, le=1024)
    gpus_per_node: int = field_in(0, ge=0, le=64)
    cpus_per_task: int | None = field_in(None, gt=0, le=4096)  # None: Slurm's default (1)
    mem_gb: float | None = field_in(None, gt=0, le=2**20)
    time_min: int = field_in(60, gt=0, le=10**7)
    partition: str | None = field_in(None, nonempty=True)
    account: str | None = field_in(None, nonempty=True)
    qos: str | None = field_in(None, nonempty=True)
    constraint: str | None = field_in(None, nonempty=True)
    exclude: str | None = field_in(None, nonempty=True)
    job_name: str = field_in("fmtrain", nonempty=True)
    sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch flags: {reservation: x, exclusive: true}
    setup: list[str] = field_in(list, items=Domain())  # shell lines before the job runs (module load, exports)
    signal_delay_s: int = field_in(120, ge=0, le=86400)  # USR2 this long before the time limit: save, requeue, resume
    max_requeues: int = field_in(3, ge=0, le=1000)  # preemptions/time limits survived, then the job ends "stopped"
    array_parallelism: int = field_in(16, gt=0, le=10**5)  # -m sweeps: tasks of the job array running at once
    env_allow: list[str] = field_in(list, items=Domain(nonempty=True))  # secret-looking variables to pass to the job anyway
    code_snapshot: bool = True  # jobs run a copy of fmtrain taken at submission
    # ray: Ray Train (TorchTrainer) workers on a Ray cluster
    address: str | None = field_in(
        None, nonempty=True
    )  # None: start a local Ray for this run; "auto"; or the cluster's host:port
    num_workers: int = field_in(2, gt=0, le=10**5)
    cpus_per_worker: float = field_in(1.0, gt=0, le=4096)
    gpus_per_worker: float = field_in(0.0, ge=0, le=64)
    max_failures: int = field_in(0, ge=0, le=1000)  # worker-group restarts, each resuming from the newest checkpoint
    object_store_mb: int = field_in(256, gt=0, le=2**20)  # the local Ray's object store (fmtrain moves no data through it)
    submit: str = "foreground"  # "jobs": submit through the Ray Jobs API (address = the dashboard's URL) and return its id


def world_size_of(launcher: LauncherConfig) -> int:
    """How many ranks a launcher starts."""
    if launcher.name == "slurm":
        return slurm_world_size(launcher)
    if launcher.name == "ray":
        return launcher.num_workers
    return launcher.nproc


def slurm_world_size(launcher: LauncherConfig) -> int:
    """Ranks of a Slurm job: nodes x tasks per node x ranks per task."""
    return launcher.nodes * tasks_per_node(launcher) * procs_per_task(launcher)


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

    name: str = field_in("none", nonempty=True)
    scheduler: str = field_in(
        "asha", choices=("asha", "pbt", "fifo")
    )  # asha (stop bad trials early) | pbt (exploit good trials' checkpoints) | fifo
    search: str = field_in("random", choices=("random", "grid", "optuna"))  # random | grid | optuna
    num_samples: int = field_in(8, gt=0, le=10**6)
    metric: str = field_in("val_loss", choices=("val_loss",))
    mode: str = field_in("min", choices=("min", "max"))
    max_concurrent: int = field_in(2, gt=0, le=10**4)
    cpus_per_trial: float = field_in(
        1.0, gt=0, le=4096
    )  # per rank: a trial of launcher.nproc=N ranks takes N x this (Slurm trials: see launcher)
    grace_period: int = field_in(1, gt=0, le=10**6)  # asha: evaluations before a trial may be stopped
    reduction_factor: int = field_in(3, gt=1, le=1000)  # asha: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = field_in(2, gt=0, le=10**6)  # pbt: evaluations between exploit/explore decisions
    # pbt: decide when every trial has reached the interval (reproducible from the seed); false: as each
    # arrives (no trial waits for the slowest, but which trials are compared depends on timing)
    synch: bool = True
    space: dict[str, Any] = field(default_factory=dict)  # nested keys allowed: {optim: {lr: "..."}}
    resume: bool = False  # continue an interrupted sweep in run_dir; finished trials are not rerun
    address: str | None = field_in(None, nonempty=True)  # the Ray cluster for the trials; None starts a local Ray


@dataclass
class TrainConfig:
    experiment: str = field_in("default", nonempty=True)
    run_dir: str = field_in("outputs/default/run", nonempty=True, path=True)
    seed: int = field_in(1337, ge=0, lt=2**63)
    # Modules every process of the run imports first: where your own models register themselves
    # (fmtrain.models.register), e.g. imports=[my_models]; they must be importable on every node.
    imports: list[str] = field_in(list, items=Domain(nonempty=True))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
