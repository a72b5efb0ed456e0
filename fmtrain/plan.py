"""What a plan costs each rank, computed on the meta device: nothing is allocated or started.

    fmtrain plan model=8b strategy=fsdp_tp strategy.tp=8 world_size=4096

Per rank: parameters, gradients and AdamW state (exactly as the strategy shards them, FSDP2's
padding included), plus an activation estimate for one micro-batch. Parameters, gradients and
optimizer state are fp32 under every precision (bf16 is a compute dtype here, not a storage one),
except under DeepSpeed, whose 16-bit parameters sit beside fp32 master partitions (:func:`zero_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from fmtrain import hardware, models
from fmtrain.config import TrainConfig, micro_batch_size
from fmtrain.parallel import SHARDED, TENSOR_PARALLEL, ParallelDims

FP32 = 4
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32 each


@dataclass
class Sizes:
    """What one rank holds: parameters (all of them, and its own), and bytes by kind."""

    total_params: int
    params_per_rank: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    micro_batch: int
    dp: int
    tp: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass
class Plan(Sizes):
    """A plan's :class:`Sizes`, with what it is a plan of and this machine's verdict on it."""

    model: str
    strategy: str
    precision: str
    world_size: int
    seq_len: int
    device: str  # this machine's device, as fmtrain.hardware sees it
    device_check: str  # "supported", or why this machine's device cannot run the strategy and precision

    def table(self) -> str:
        gib = 1024**3
        rows = [
            ("mesh", f"dp {self.dp} x tp {self.tp} = {self.world_size} ranks ({self.strategy}, {self.precision})"),
            ("model", f"{self.model}: {self.total_params / 1e9:.3f}B parameters, {self.params_per_rank:,} per rank"),
            ("parameters", f"{self.param_bytes / gib:8.3f} GiB"),
            ("gradients", f"{self.grad_bytes / gib:8.3f} GiB"),
            ("optimizer", f"{self.optimizer_bytes / gib:8.3f} GiB  (AdamW, 2 fp32 states)"),
            (
                "activations",
                f"{self.activation_bytes / gib:8.3f} GiB  (estimate: micro-batch {self.micro_batch} x {self.seq_len} tokens)",
            ),
            ("total", f"{self.total_bytes / gib:8.3f} GiB per rank"),
            ("this device", f"{self.device} -> {self.strategy} {self.precision}: {self.device_check}"),
        ]
        return "\n".join(f"{name:<12} {value}" for name, value in rows)

    def as_dict(self) -> dict:
        return asdict(self) | {"total_bytes": self.total_bytes}


def _local_numel(shape: torch.Size, tp_dim: int | None, dims: ParallelDims, sharded: bool) -> int:
    """Elements of one parameter that a rank holds: TP splits ``tp_dim``, FSDP2 then dim 0 (padded)."""
    sizes = list(shape)
    if tp_dim is not None:
        sizes[tp_dim] = math.ceil(sizes[tp_dim] / dims.tp)
    if sharded:
        sizes[0] = math.ceil(sizes[0] / dims.dp)
    return math.prod(sizes)


def activation_bytes(cfg: TrainConfig, micro: int, tp: int) -> int:
    """Activations kept for backward in one micro-batch, after Korthikanti et al. (2022), eq. 2
    (tensor parallel) and eq. 4 (with sequence parallelism, which splits the other 10 too).

    Per layer ``s*b*h*(10 + 24/t)`` bytes in 16-bit (``s*b*h*34/t`` with sequence parallelism),
    doubled for fp32 compute, plus the fp32 logits and their gradient. Their ``5*a*s/(h*t)`` term
    (the stored attention matrix) is left out: fused scaled-dot-product attention keeps no s x s
    matrix. An estimate: SwiGLU keeps a little more than GELU.
    """
    s, b, h = cfg.data.seq_len, micro, cfg.model.dim
    split = tp if cfg.strategy.sequence_parallel else 1
    per_layer = s * b * h * (10 / split + 24 / tp)
    width = 1 if cfg.precision.name == "fp32" else 0.5
    logits = 2 * s * b * cfg.model.vocab_size * FP32
    return int(cfg.model.n_layers * per_layer * 2 * width + logits)


def zero_bytes(numel: int, dp: int, stage: int, precision: str, offload_optimizer: bool = False) -> tuple[int, int, int, int]:
    """DeepSpeed ZeRO per rank: (parameters held, parameter bytes, gradient bytes, optimizer bytes).

    ZeRO partitions flat buffers over the data-parallel ranks (alignment padding left out). The
    model's parameters are in the compute dtype (fp32, or 16-bit for bf16/fp16), and DeepSpeed
    keeps an fp32 master partition beside them, except where fmtrain makes the fp32 parameter
    partition the master itself (ZeRO-3 in fp32 without optimizer offload; ``_share_fp32_master``).
    Stage 1 partitions the optimizer state, 2 also gradients, 3 also parameters.
    """
    low = FP32 if precision == "fp32" else 2
    part = math.ceil(numel / dp)
    held = part if stage == 3 else numel
    shared_master = stage == 3 and precision == "fp32" and not offload_optimizer
    param_bytes = held * low + (0 if shared_master else part * FP32)
    return held, param_bytes, (part if stage >= 2 else numel) * low, part * FP32 * ADAM_STATES


def planned_precision(cfg: TrainConfig) -> tuple[str, str]:
    """The precision the plan assumes, and how to show it: ``auto`` as this machine resolves it for a
    local run; for a job on other nodes fp32, the larger of what their devices may choose."""
    name = cfg.precision.name
    if name != "auto":
        return name, name
    if cfg.launcher.name == "local":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
        resolved = hardware.resolve_precision(kind, cfg.strategy.name, name)[0]
        return resolved, f"auto -> {resolved}"
    return "fp32", "auto (each rank's device decides; fp32 assumed)"


def sizes(cfg: TrainConfig, world_size: int) -> Sizes:
    """Each rank's share of the model and its training state, from a meta build (nothing allocated)."""
    cfg = replace(cfg, precision=replace(cfg.precision, name=planned_precision(cfg)[0]))
    dims = ParallelDims.from_config(cfg.strategy, world_size)
    recipe = models.recipe(cfg)
    if cfg.strategy.name in TENSOR_PARALLEL:
        recipe.spec.check_tensor_parallel(cfg.model, cfg.strategy.name, dims.tp, cfg.strategy.sequence_parallel)
    model = recipe.meta()
    num_params = sum(p.numel() for p in model.parameters())
    tp_dims = {"colwise": 0, "rowwise": 1} if dims.tp > 1 else {}
    tp_plan = (recipe.spec.tp_plan(model) or {}) if tp_dims else {}
    plan = {f"{path}.weight": tp_dims.get(style) for path, style in tp_plan.items()}
    sharded = cfg.strategy.name in SHARDED
    local = sum(_local_numel(p.shape, plan.get(name), dims, sharded) for name, p in model.named_parameters())
    param_bytes, grad_bytes, optimizer_bytes = local * FP32, local * FP32, local * FP32 * ADAM_STATES
    if cfg.strategy.name == "deepspeed":
        local, param_bytes, grad_bytes, optimizer_bytes = zero_bytes(
            num_params, dims.dp, cfg.strategy.zero_stage, cfg.precision.name, cfg.strategy.offload_optimizer
        )
    micro = micro_batch_size(cfg.trainer, dims.dp)
    activations = activation_bytes(cfg, micro, dims.tp)
    return Sizes(num_params, local, param_bytes, grad_bytes, optimizer_bytes, activations, micro, dims.dp, dims.tp)


def make_plan(cfg: TrainConfig, world_size: int) -> Plan:
    size = sizes(cfg, world_size)
    if cfg.launcher.name == "local":
        caps = hardware.probe("cuda" if torch.cuda.is_available() else "cpu", engines=cfg.strategy.name == "deepspeed")
        refusal = caps.refusal(cfg.strategy.name, planned_precision(cfg)[0])
        device, device_check = caps.describe(), f"refused: {refusal}" if refusal else "supported"
    else:  # the job's nodes are not this machine (nor is DeepSpeed imported here to ask): each rank asks its own
        device, device_check = f"the {cfg.launcher.name} job's nodes", "checked by each rank on its own device"
    return Plan(
        **asdict(size),
        model=cfg.model.name,
        strategy=cfg.strategy.name,
        precision=planned_precision(cfg)[1],
        world_size=world_size,
        seq_len=cfg.data.seq_len,
        device=device,
        device_check=device_check,
    )
