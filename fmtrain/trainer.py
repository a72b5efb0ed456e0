"""``run(cfg)``: one training process, the same library call under every launcher.

    from fmtrain import config, run
    result = run(config.load("outputs/default/run/config.yaml"))   # RANK/WORLD_SIZE from the env

Order of a run: join the process group -> prepare data (one builder per node) -> build the model on
the meta device and initialise it from the seed -> wrap it in the strategy -> restore the newest
valid checkpoint -> loop (step, accumulate, clip, log, evaluate, checkpoint, watch signals).

Signals (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) only set a flag. The flag is summed across ranks with
the step's loss, so every rank sees it at the same step, saves there and returns "stopped".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fmtrain.checkpoint import Checkpointer
from fmtrain.config import TrainConfig, accumulation_steps, micro_batch_size
from fmtrain.data import Corpus, GlobalBatches, eval_windows, prepare
from fmtrain.distributed import DistEnv
from fmtrain.metrics import (
    MetricsWriter,
    NullMetrics,
    cached_peak_flops,
    measure_peak_flops,
    peak_memory_bytes,
    plot_losses,
    store_peak_flops,
)
from fmtrain.model import Transformer
from fmtrain.optim import build_optimizer, lr_at
from fmtrain.strategies import Strategy, compute_dtype, make_strategy
from fmtrain.validation import validate

log = logging.getLogger("fmtrain")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class RunResult:
    status: str  # "completed" or "stopped" (a signal asked for a stop; the state was saved)
    step: int
    loss: float | None
    val_loss: float | None
    run_dir: str
    stop_signal: str = ""  # the signal this rank received, when stopped: SIGUSR2 = preemption or time limit


class StopFlag:
    """Records the first stop signal; the handler does nothing else (no I/O, no collectives)."""

    def __init__(self) -> None:
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. a Ray Train worker's loop thread: the host process owns the signals
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum


def config_hash(cfg: TrainConfig) -> str:
    """Hash of what determines the numbers: model, data, optimizer, seed and global batch."""
    relevant = {k: asdict(cfg)[k] for k in ("model", "data", "optim", "seed")}
    relevant["global_batch_size"] = cfg.trainer.global_batch_size
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    handlers[0].setFormatter(logging.Formatter(f"%(asctime)s rank{rank} pid %(process)d %(levelname)s %(message)s"))
    if rank == 0:
        if sys.stdout.isatty():
            from rich.logging import RichHandler

            handlers.append(RichHandler(show_path=False))
        else:
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter("[fmtrain] %(message)s"))
            handlers.append(console)
    log.handlers[:] = handlers
    log.setLevel(logging.INFO)
    log.propagate = False


def _prepare_data(cfg: TrainConfig, env: DistEnv) -> Corpus:
    """Local rank 0 tokenizes (once per node, cached); the others wait, then open the cache."""
    if env.local_rank == 0:
        corpus = prepare(cfg.data, cfg.model.vocab_size)
    env.barrier()
    if env.local_rank != 0:
        corpus = prepare(cfg.data, cfg.model.vocab_size)
    return corpus


def _injected_fault(rank: int) -> int | None:
    """FMTRAIN_FAULT=RANK:STEP raises in that rank at that step: a hook for testing launchers."""
    spec = os.environ.get("FMTRAIN_FAULT", "")
    if not spec:
        return None
    fault_rank, fault_step = (int(v) for v in spec.split(":"))
    return fault_step if fault_rank == rank else None


EvalHook = Callable[[int, float, "Path | None"], None]


def run(cfg: TrainConfig, on_eval: EvalHook | None = None) -> RunResult:
    """Train according to ``cfg`` in this process, as one rank of the world in the environment.

    ``on_eval(step, val_loss, checkpoint)`` is called on rank 0 after each evaluation, with the
    checkpoint saved at that step if there is one (``fmtrain tune`` reports to Ray Tune through it).

    Raises:
        ConfigError: for a config that cannot run, as ``fmtrain train`` would refuse it (before
            anything is written), so a library caller never meets a KeyError from deep inside.
    """
    env = DistEnv.from_environ()
    validate(cfg, world_size=env.world_size)  # the world this rank is in (a launcher's is checked before it starts)
    stop = StopFlag()
    run_dir = Path(cfg.run_dir)
    setup_logging(run_dir, env.rank)
    device = env.init(cfg.trainer.device)
    try:
        return _train(cfg, env, device, run_dir, stop, on_eval)
    finally:
        env.close()


@dataclass
class Parts:
    """What a run is built from, once, before the loop."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    corpus: Corpus
    batches: GlobalBatches
    val_ids: list[int]
    model: Transformer  # the plain module: evaluation
    num_params: int  # counted before a strategy partitions the parameters
    flops_per_token: float
    wrapped: nn.Module  # what the strategy trains
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling
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


def _build(cfg: TrainConfig, env: DistEnv, device: torch.device) -> Parts:
    t = cfg.trainer
    strategy = make_strategy(cfg.strategy, cfg.precision.name, t, env, device)
    if strategy.needs_process_group and not dist.is_initialized():
        raise RuntimeError(f"strategy={cfg.strategy.name} needs torch.distributed: start it with a launcher (fmtrain train)")
    micro = micro_batch_size(t, strategy.dp_size)
    corpus = _prepare_data(cfg, env)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    num_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.data.seq_len)
    wrapped = strategy.build(model, cfg.seed)
    built = getattr(wrapped, "module", wrapped)  # evaluation runs the model itself, outside DDP's hooks
    assert isinstance(built, Transformer), type(built)
    accum = accumulation_steps(t, strategy.dp_size)
    wrapped, optimizer = strategy.attach_optimizer(
        wrapped, build_optimizer(wrapped, cfg.optim), micro=micro, accum=accum, grad_clip=cfg.optim.grad_clip
    )
    return Parts(
        cfg=cfg,
        env=env,
        device=device,
        corpus=corpus,
        batches=GlobalBatches(corpus.train, cfg.data.seq_len, cfg.seed),
        val_ids=eval_windows(corpus.val, cfg.data.seq_len, t.eval_batches * t.global_batch_size),
        model=built,
        num_params=num_params,
        flops_per_token=flops_per_token,
        wrapped=wrapped,
        strategy=strategy,
        optimizer=optimizer,
        scaler=strategy.grad_scaler(),
        micro=micro,
        accum=accum,
    )


def _train_step(p: Parts, step: int, consumed: int, stop: StopFlag) -> StepOutcome:
    """Forward and backward over the global batch, then one update (or a skip, or an error)."""
    env, device = p.env, p.device
    local_loss = torch.zeros((), dtype=torch.float64, device=device)
    for micro_step in range(p.accum):
        rows = p.batches.micro_batch(consumed, micro_step, p.strategy.dp_rank, p.micro, p.strategy.dp_size)
        inputs, targets = (x.to(device) for x in rows)
        sync = p.strategy.no_sync(p.wrapped) if micro_step < p.accum - 1 else contextlib.nullcontext()
        with sync:
            with p.strategy.autocast():
                logits = p.wrapped(inputs)
            micro_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            scaled = micro_loss / p.accum
            p.strategy.backward(p.wrapped, p.scaler.scale(scaled) if p.scaler else scaled, boundary=micro_step == p.accum - 1)
        local_loss += micro_loss.detach()
    local_loss /= p.accum
    # One collective per step carries the loss, the non-finite count and the stop flag.
    # (Tensor-parallel peers hold equal losses, so the mean over all ranks is the batch mean.)
    stop_flag = torch.tensor(float(stop.signum > 0), dtype=torch.float64, device=device)
    stats = torch.stack([local_loss, (~torch.isfinite(local_loss)).double(), stop_flag])
    if env.distributed:
        dist.all_reduce(stats)
    loss, bad_ranks, stop_requested = float(stats[0]) / env.world_size, int(stats[1]), bool(stats[2])
    if p.strategy.owns_step:
        return _engine_step(p, step, loss, bad_ranks, stop_requested)
    if p.scaler:
        p.scaler.unscale_(p.optimizer)
    grad_norm = float(p.strategy.clip_grad_norm(p.wrapped, p.cfg.optim.grad_clip))
    skipped = bool(bad_ranks) or not math.isfinite(grad_norm)
    if p.scaler and skipped and not bad_ranks:
        # fp16 gradients overflowed: expected now and then; the scaler skips and lowers the scale.
        p.scaler.step(p.optimizer)
        p.scaler.update()
        log.info("fp16 overflow at step %d: update skipped, loss scale now %g", step, p.scaler.get_scale())
    elif skipped:
        if not math.isfinite(float(local_loss)):
            message = f"non-finite loss ({float(local_loss)}) at step {step} on rank {env.rank}"
        elif bad_ranks:
            message = f"non-finite loss at step {step} on {bad_ranks} rank(s) other than rank {env.rank}"
        else:
            message = f"non-finite gradient norm ({grad_norm}) at step {step} (loss {loss:.4f})"
        if p.cfg.trainer.on_nonfinite == "error":
            raise NonFiniteLossError(message)
        log.warning("%s: skipping the update (trainer.on_nonfinite=skip)", message)
        if p.scaler:
            p.scaler.update()
    elif p.scaler:
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        p.optimizer.step()
    state_bytes = p.strategy.state_bytes(p.wrapped, p.optimizer)
    optim_state_bytes = p.strategy.optimizer_state_bytes(p.optimizer)
    p.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so that the step's wall time is the step's work
    return StepOutcome(loss, grad_norm, skipped, stop_requested, state_bytes, optim_state_bytes)


def _engine_step(p: Parts, step: int, loss: float, bad_ranks: int, stop_requested: bool) -> StepOutcome:
    """The update where the strategy's engine clips, scales and steps (DeepSpeed).

    A non-finite loss is an error before the engine steps (validation refuses ``on_nonfinite=skip``
    here); fp16 overflows are the engine's to skip, and it lowers its loss scale.
    """
    if bad_ranks:
        raise NonFiniteLossError(f"non-finite loss at step {step} on {bad_ranks} rank(s)")
    grad_norm, skipped = p.strategy.step(p.wrapped, p.optimizer)
    if skipped:
        log.info("fp16 overflow at step %d: update skipped by the engine", step)
    elif not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step} (loss {loss:.4f})")
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    held = p.strategy.state_bytes(p.wrapped, p.optimizer)
    return StepOutcome(loss, grad_norm, skipped, stop_requested, held, p.strategy.optimizer_state_bytes(p.optimizer))


def _evaluate(p: Parts) -> float:
    """Mean loss per token over the fixed validation windows, shared out across ranks."""
    p.model.eval()
    mine = p.val_ids[p.strategy.dp_rank :: p.strategy.dp_size]
    total = torch.zeros(2, dtype=torch.float64, device=p.device)
    with torch.no_grad(), p.strategy.autocast():
        for start in range(0, len(mine), p.micro):
            rows = p.corpus.val.windows(mine[start : start + p.micro], p.cfg.data.seq_len).to(p.device)
            logits = p.model(rows[:, :-1])
            total[0] += F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum")
            total[1] += rows[:, 1:].numel()
    if p.env.distributed:
        dist.all_reduce(total)  # tensor-parallel peers add equal parts to both sums: the ratio holds
    p.model.train()
    return float(total[0] / total[1])


def _train(
    cfg: TrainConfig, env: DistEnv, device: torch.device, run_dir: Path, stop: StopFlag, on_eval: EvalHook | None = None
) -> RunResult:
    t = cfg.trainer
    torch.manual_seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    p = _build(cfg, env, device)
    if env.is_main:
        for name, text in p.strategy.files().items():
            (run_dir / name).write_text(text)
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        env,
        p.strategy,
        keep_last=cfg.checkpoint.keep_last,
        keep_best=cfg.checkpoint.keep_best,
        identity={"strategy": cfg.strategy.name, "config_hash": config_hash(cfg)},
    )
    state: dict[str, Any] = {"step": 0, "consumed": 0, "best_val_loss": None, "val_loss": None}
    restored = checkpointer.choose(t.resume)
    if restored is not None:
        state = checkpointer.load(restored, p.wrapped, p.optimizer)
        manifest = json.loads((restored / "manifest.json").read_text())
        if manifest["config_hash"] != config_hash(cfg):
            log.warning("resuming %s under a config whose model/data/optim/seed/batch differ from the saved one", restored)
        if p.scaler and "grad_scaler" in state:
            p.scaler.load_state_dict(state["grad_scaler"])
        if "engine_loss_scaler" in state and p.strategy.engine_scaler_state(p.optimizer) is not None:
            p.strategy.load_engine_scaler_state(p.optimizer, state["engine_loss_scaler"])
        log.info("resumed from %s at step %d", restored, state["step"])

    flops_per_token = p.flops_per_token
    peak = t.peak_flops or _measured_peak(env, device, cfg.precision.name)
    log.info(
        "model %s: %.2fM parameters, %.1f MFLOPs/token | %s, world %d (dp %d x tp %d), "
        "micro-batch %d x %d accumulation | %s on %s",
        cfg.model.name,
        p.num_params / 1e6,
        flops_per_token / 1e6,
        cfg.strategy.name,
        env.world_size,
        p.strategy.dims.dp,
        p.strategy.dims.tp,
        p.micro,
        p.accum,
        cfg.precision.name,
        device,
    )
    metrics = (
        MetricsWriter(run_dir, start_step=state["step"], max_steps=t.max_steps, progress=t.progress, log_interval=t.log_interval)
        if env.is_main
        else NullMetrics()
    )

    def save() -> Path:
        if p.scaler:
            state["grad_scaler"] = p.scaler.state_dict()
        if (engine_scaler := p.strategy.engine_scaler_state(p.optimizer)) is not None:
            state["engine_loss_scaler"] = engine_scaler
        return checkpointer.save(state["step"], p.wrapped, p.optimizer, state)

    _warm_imports(plot=t.plot and env.is_main)
    fault_step = _injected_fault(env.rank)
    status, loss, last_saved = "completed", None, state["step"]
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    while state["step"] < t.max_steps:
        step = state["step"]
        if fault_step == step:
            raise RuntimeError(f"injected fault (FMTRAIN_FAULT) in rank {env.rank} at step {step}")
        lr = lr_at(step, cfg.optim, t.max_steps)
        for group in p.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        outcome = _train_step(p, step, state["consumed"], stop)
        elapsed = time.perf_counter() - started
        state["step"], state["consumed"], loss = step + 1, state["consumed"] + t.global_batch_size, outcome.loss
        tokens_per_s = tokens_per_step / elapsed
        metrics.log(
            {
                "step": step + 1,
                "loss": outcome.loss,
                "lr": lr,
                "grad_norm": outcome.grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": flops_per_token * tokens_per_s / peak,
                "peak_mem_bytes": peak_memory_bytes(device),
                "state_bytes": outcome.state_bytes,
                "optim_state_bytes": outcome.optim_state_bytes,
                "step_time_s": elapsed,
                "skipped": outcome.skipped,
                **({"loss_scale": p.scaler.get_scale()} if p.scaler else {}),
                **(
                    {"loss_scale": engine_scaler["scale"]}
                    if (engine_scaler := p.strategy.engine_scaler_state(p.optimizer))
                    else {}
                ),
                "time": time.time(),
            }
        )
        metrics.progress(step + 1, f"loss {outcome.loss:.4f} | {tokens_per_s:,.0f} tok/s")

        done = state["step"] == t.max_steps
        state["val_loss"] = None
        if state["step"] % t.eval_interval == 0 or done:
            state["val_loss"] = _evaluate(p)
            if state["best_val_loss"] is None or state["val_loss"] < state["best_val_loss"]:
                state["best_val_loss"] = state["val_loss"]
            metrics.log({"step": state["step"], "val_loss": state["val_loss"]})
            log.info("step %d: val_loss %.4f", state["step"], state["val_loss"])
        saved = None
        if state["step"] % cfg.checkpoint.interval == 0 or done or outcome.stop_requested:
            saved = save()
            last_saved = state["step"]
        if on_eval is not None and env.is_main and state["val_loss"] is not None:
            on_eval(state["step"], state["val_loss"], saved)
        if outcome.stop_requested and not done:
            status = "stopped"
            log.warning("stop signal received: saved step %d; run the same command again to resume", state["step"])
            break

    if state["step"] != last_saved:
        save()
    metrics.close()
    stop_signal = signal.Signals(stop.signum).name if status == "stopped" and stop.signum else ""
    result = RunResult(status, state["step"], loss, state["val_loss"], str(run_dir), stop_signal)
    if env.is_main:
        if t.plot:
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _measured_peak(env: DistEnv, device: torch.device, precision: str) -> float:
    """Peak FLOP/s of the whole world: every rank probes at once and the results are summed.

    The probe's result is cached per machine (CPU, threads, ranks sharing it, dtype), so only the
    first run on a machine pays for it.
    """
    dtype = compute_dtype(precision)
    key, cached = cached_peak_flops(dtype, device, env.local_world_size)
    need = torch.tensor(float(cached is None), device=device)
    if env.distributed:
        dist.all_reduce(need)
    if need.item():
        cached = measure_peak_flops(dtype, device)
        if env.local_rank == 0:
            store_peak_flops(key, cached)
    mine = torch.tensor(cached, dtype=torch.float64, device=device)
    if env.distributed:
        dist.all_reduce(mine)
    return float(mine)


def _warm_imports(plot: bool) -> None:
    """Import what the end of the run needs on a thread, while the first steps compute.

    Torch ops release the GIL, so these ~1 s of imports (checkpointing, plotting) overlap with
    training instead of delaying the first save and the end of a short run.
    """

    def work() -> None:
        import torch.distributed.checkpoint
        import torch.distributed.checkpoint.state_dict  # noqa: F401

        if plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot

    threading.Thread(target=work, name="fmtrain-warm-imports", daemon=True).start()
