"""One optimizer step over the global batch, and evaluation: the parts of a run the loop calls.

    parts = build(cfg, env, device)                   # data, model (through its spec), strategy, optimizer
    outcome = train_step(parts, step, consumed, stop) # forward/backward per micro-batch, one optimizer step
    val_loss = evaluate(parts)                        # mean loss per token over fixed validation windows

Batches are dicts (:mod:`fmtrain.losses`); the loss is ``parts.loss_fn``; how gradients are
unscaled, clipped and applied is the strategy's (:meth:`Strategy.optimizer_step`), the same call
for every strategy, DeepSpeed's engine included. What happens to a step that could not update
(``trainer.on_nonfinite``) is decided here, once.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from fmtrain import pretrained
from fmtrain.config import TrainConfig, accumulation_steps, micro_batch_size
from fmtrain.data import Corpus, GlobalBatches, Mixture, prepare
from fmtrain.distributed import DistEnv
from fmtrain.losses import LossFn, cross_entropy, cross_entropy_sum
from fmtrain.models import recipe as model_recipe
from fmtrain.models.spec import ModelSpec
from fmtrain.optim import build_optimizer
from fmtrain.strategies import Strategy, make_strategy
from fmtrain.tokenizer import tokenizer_of

log = logging.getLogger("fmtrain")


class StopSignal(Protocol):
    signum: int  # the stop signal received on this rank, 0 for none


class NonFiniteLossError(FloatingPointError):
    pass


def prepare_data(cfg: TrainConfig, env: DistEnv) -> Corpus | Mixture:
    """Local rank 0 tokenizes (once per node, cached); the others wait, then open the cache."""
    tokenizer = tokenizer_of(cfg)
    if env.local_rank == 0:
        corpus = prepare(cfg.data, cfg.model.vocab_size, tokenizer)
    env.barrier()
    if env.local_rank != 0:
        corpus = prepare(cfg.data, cfg.model.vocab_size, tokenizer)
    return corpus


@dataclass
class Parts:
    """What a run is built from, once, before the loop."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    corpus: Corpus | Mixture
    batches: GlobalBatches
    val_ids: list[int]
    model: nn.Module  # the plain module: evaluation
    num_params: int  # counted before a strategy partitions the parameters
    flops_per_token: float
    wrapped: nn.Module  # what the strategy trains
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    micro: int  # sequences per rank per forward
    accum: int  # forwards per optimizer step


@dataclass
class StepOutcome:
    loss: float  # mean over the global batch
    grad_norm: float
    skipped: bool
    stop_requested: bool
    state_bytes: int  # parameters + gradients + optimizer state held by this rank
    optim_state_bytes: int  # the optimizer state alone


# trainer.compile=auto compiles when the run's eager compute is estimated at this many seconds or more:
# per-block compile costs tens of seconds and saves a share of every later step, so by then it has paid
# for itself. On 2 CPU cores (bench/results/step_compiled.json, one sitting, alternating rounds) compiled
# blocks were 1-20% faster than eager at both shapes and both dtypes (an earlier sitting: -4% to +25%; the
# bf16 that precision=auto picks where the CPU has it gained 14-20%), and the first two steps took 20-40 s
# longer with a cold inductor cache (a few seconds with a warm one): 10 minutes of compute pays that on a
# CPU too. That was an Intel CPU with AMX; on an AMD EPYC (step_compiled@amd.json, 2026-12-06) compiled
# blocks were 0.95-1.06x eager, inside that sitting's noise: there compiling neither pays nor costs more
# than its start (<= 7% of a 10-minute run). The default run (~1 minute) stays eager.
COMPILE_PAYS_AFTER_S = 600.0
EAGER_MFU = 0.5  # what the estimate assumes of an eager step (CPUs reach 16-76%: their runs last longer)


def resolve_compile(
    cfg: TrainConfig, spec: ModelSpec, env: DistEnv, device: torch.device, flops_per_token: float
) -> tuple[bool, str]:
    """Whether to compile each block (``trainer.compile``), and why.

    ``auto``: on a GPU or a CPU, where the architecture compiles cleanly (:attr:`ModelSpec.compiles`)
    and the run's whole compute, estimated from its FLOPs and the device's peak at :data:`EAGER_MFU`,
    is at least :data:`COMPILE_PAYS_AFTER_S` (on a CPU, if every rank compiles a probe: inductor needs a C++ compiler);
    ``$FMTRAIN_COMPILE_AUTO`` pins it. The estimate counts ``trainer.max_steps``, not the steps left,
    so a resumed run decides as the first did (but for a run right at the threshold whose peak is
    measured again in between). Every rank decides alike: the peak is the world's (one all-reduce).
    """
    from fmtrain.hardware import COMPILE_PIN, compile_pin, cpu_compile_problem
    from fmtrain.metrics import world_peak_flops
    from fmtrain.strategies import compute_dtype

    t = cfg.trainer
    if t.compile != "auto":
        return t.compile == "true", f"trainer.compile={t.compile}"
    if (pinned := compile_pin()) is not None:
        return pinned, f"trainer.compile=auto, pinned by ${COMPILE_PIN}"
    if not spec.compiles:
        return False, f"trainer.compile=auto: model.arch={cfg.model.arch} compiles only with trainer.compile=true"
    if device.type not in ("cuda", "cpu"):
        why = f"eager on {device.type}, where compiling is not measured; trainer.compile=true compiles"
        return False, f"trainer.compile=auto: {why}"
    peak = t.peak_flops or world_peak_flops(env, device, compute_dtype(cfg.precision.name))
    flops = t.max_steps * t.global_batch_size * cfg.data.seq_len * flops_per_token
    seconds = flops / (EAGER_MFU * peak)
    estimate = f"{t.max_steps} steps estimated at {seconds / 60:.1f} min eager ({EAGER_MFU:.0%} of {peak:.3g} FLOP/s)"
    if seconds < COMPILE_PAYS_AFTER_S:
        return False, f"trainer.compile=auto: {estimate}, under the {COMPILE_PAYS_AFTER_S / 60:.0f} min compiling needs to pay"
    if device.type == "cpu":  # all ranks compile, or none: each tries, and they agree (the same branch: the world's peak)
        problem = cpu_compile_problem()
        able = torch.tensor(float(problem is None))
        if env.distributed:
            dist.all_reduce(able, op=dist.ReduceOp.MIN)
        if not able.item():
            why = f"this rank cannot: {problem}" if problem else "another rank cannot"
            return False, f"trainer.compile=auto: {estimate}, long enough to pay, but torch.compile fails on CPU ({why}): eager"
    return True, f"trainer.compile=auto: {estimate}, long enough for compiling to pay"


def build(cfg: TrainConfig, env: DistEnv, device: torch.device) -> Parts:
    strategy = make_strategy(cfg.strategy, cfg.precision.name, cfg.trainer, env, device)
    if strategy.needs_process_group and not dist.is_initialized():
        raise RuntimeError(f"strategy={cfg.strategy.name} needs torch.distributed: start it with a launcher (fmtrain train)")
    recipe = model_recipe(cfg)
    num_params, flops_per_token = recipe.sizes(cfg.data.seq_len)
    compiled, why = resolve_compile(cfg, recipe.spec, env, device, flops_per_token)
    log.info("%s each block (%s)", "compiling" if compiled else "not compiling", why)
    cfg = replace(cfg, trainer=replace(cfg.trainer, compile="true" if compiled else "false"))
    t = strategy.trainer = cfg.trainer  # what prepare_blocks reads: "auto" resolved
    micro = micro_batch_size(t, strategy.dp_size)
    corpus = prepare_data(cfg, env)
    source = pretrained.initial_weights(cfg)
    # A Hugging Face directory sets every weight (a missing one is an error): no seeded draw before it.
    wrapped = strategy.build(recipe, None if pretrained.sets_every_weight(source) else cfg.seed)
    if source is not None:
        pretrained.load(wrapped, recipe, source)  # weights only; a resume comes later
    built = getattr(wrapped, "module", wrapped)  # evaluation runs the model itself, outside DDP's hooks
    if cfg.trainer.freeze:
        fixed = [name for name, param in built.named_parameters() if not param.requires_grad]
        log.info(
            "trainer.freeze keeps %d parameter tensors fixed (%s)",
            len(fixed),
            ", ".join(fixed[:4]) + (", ..." if len(fixed) > 4 else ""),
        )
    accum = accumulation_steps(t, strategy.dp_size)
    wrapped, optimizer = strategy.attach_optimizer(
        wrapped, build_optimizer(wrapped, cfg.optim), micro=micro, accum=accum, grad_clip=cfg.optim.grad_clip
    )
    return Parts(
        cfg=cfg,
        env=env,
        device=device,
        corpus=corpus,
        batches=corpus.sampler(cfg.data.seq_len, cfg.seed),
        val_ids=corpus.eval_ids(cfg.data.seq_len, t.eval_batches * t.global_batch_size),
        model=built,
        num_params=num_params,
        flops_per_token=flops_per_token,
        wrapped=wrapped,
        strategy=strategy,
        optimizer=optimizer,
        loss_fn=cross_entropy,
        micro=micro,
        accum=accum,
    )


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a batch gives the model besides its tokens: packed examples' positions and example ids."""
    return {key: batch[key] for key in ("position_ids", "document_ids") if key in batch}


def targets_per_micro_batch(p: Parts, batches: list[dict[str, torch.Tensor]]) -> float | None:
    """With a ``loss_mask`` (fine-tuning examples), the target tokens of the whole global batch shared
    evenly over its micro-batches (one all-reduce); each micro-batch's summed loss divided by it,
    then averaged as every strategy averages (over micro-steps and data-parallel ranks), is the mean
    over all target tokens: an example's tokens weigh the same wherever it lands. None without a mask
    (windows: every micro-batch holds the same number of targets, and a micro-batch's mean is exact)."""
    if "loss_mask" not in batches[0]:
        return None
    count = torch.tensor(float(sum(int(b["loss_mask"].sum()) for b in batches)), dtype=torch.float64, device=p.device)
    if p.env.distributed:
        dist.all_reduce(count)  # tensor-parallel peers hold the same batch: counted tp times
    total = float(count) / p.strategy.dims.tp
    return max(total, 1.0) / (p.accum * p.strategy.dp_size)


def train_step(p: Parts, step: int, consumed: int, stop: StopSignal) -> StepOutcome:
    """Forward and backward over the global batch, then the strategy's one optimizer step."""
    env, device = p.env, p.device
    local_loss = torch.zeros((), dtype=torch.float64, device=device)
    batches = [p.batches.micro_batch(consumed, m, p.strategy.dp_rank, p.micro, p.strategy.dp_size) for m in range(p.accum)]
    per_micro = targets_per_micro_batch(p, batches)
    for micro_step, batch in enumerate(batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        sync = p.strategy.no_sync(p.wrapped) if micro_step < p.accum - 1 else contextlib.nullcontext()
        with sync:
            with p.strategy.autocast():
                logits = p.wrapped(batch["input_ids"], **model_inputs(batch))
            # with targets_per_micro_batch: the mean over the global batch's targets, wherever they fall
            micro_loss = p.loss_fn(logits, batch) if per_micro is None else cross_entropy_sum(logits, batch)[0] / per_micro
            p.strategy.backward(p.wrapped, micro_loss / p.accum, boundary=micro_step == p.accum - 1)
        local_loss += micro_loss.detach()
    local_loss /= p.accum
    # One collective per step carries the loss, the non-finite count and the stop flag.
    # (Tensor-parallel peers hold equal losses, so the mean over all ranks is the batch mean.)
    stop_flag = torch.tensor(float(stop.signum > 0), dtype=torch.float64, device=device)
    stats = torch.stack([local_loss, (~torch.isfinite(local_loss)).double(), stop_flag])
    if env.distributed:
        dist.all_reduce(stats)
    loss, bad_ranks, stop_requested = float(stats[0]) / env.world_size, int(stats[1]), bool(stats[2])
    done = p.strategy.optimizer_step(p.wrapped, p.optimizer, p.cfg.optim.grad_clip, loss_finite=not bad_ranks)
    if done.overflow:
        scale = p.strategy.loss_scale(p.optimizer)
        log.info(
            "fp16 overflow at step %d: update skipped, loss scale now %g", step, scale if scale is not None else float("nan")
        )
    elif not done.applied:
        if not math.isfinite(float(local_loss)):
            message = f"non-finite loss ({float(local_loss)}) at step {step} on rank {env.rank}"
        elif bad_ranks:
            message = f"non-finite loss at step {step} on {bad_ranks} rank(s) other than rank {env.rank}"
        else:
            message = f"non-finite gradient norm ({done.grad_norm}) at step {step} (loss {loss:.4f})"
        if p.cfg.trainer.on_nonfinite == "error":
            raise NonFiniteLossError(message)
        log.warning("%s: skipping the update (trainer.on_nonfinite=skip)", message)
    skipped = not done.applied
    return StepOutcome(loss, done.grad_norm, skipped, stop_requested, done.state_bytes, done.optim_state_bytes)


def evaluate(p: Parts) -> float:
    """Mean loss per token over the fixed validation windows, shared out across ranks."""
    p.model.eval()
    mine = p.val_ids[p.strategy.dp_rank :: p.strategy.dp_size]
    total = torch.zeros(2, dtype=torch.float64, device=p.device)
    with torch.no_grad(), p.strategy.autocast():
        for start in range(0, len(mine), p.micro):
            batch = p.corpus.val.batch(mine[start : start + p.micro], p.cfg.data.seq_len)
            batch = {key: value.to(p.device) for key, value in batch.items()}
            loss_sum, tokens = cross_entropy_sum(p.model(batch["input_ids"], **model_inputs(batch)), batch)
            total[0] += loss_sum
            total[1] += tokens
    if p.env.distributed:
        dist.all_reduce(total)  # tensor-parallel peers add equal parts to both sums: the ratio holds
    p.model.train()
    return float(total[0] / total[1])
