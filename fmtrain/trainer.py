"""``run(cfg)``: one training process, the same library call under every launcher.

    from fmtrain import config, run
    result = run(config.load("outputs/default/run/config.yaml"))   # RANK/WORLD_SIZE from the env

Order of a run: join the process group -> build its parts (:func:`fmtrain.step.build`: data, the
model through its spec, the strategy, the optimizer) -> restore the newest valid checkpoint -> the
loop below: a step (:func:`fmtrain.step.train_step`), its metrics, evaluation, checkpoints, and the
stop flag (:mod:`fmtrain.signals`).

Signals (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) only set a flag. The flag is summed across ranks with
the step's loss, so every rank sees it at the same step, saves there and returns "stopped".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from socket import gethostname
from typing import Any

import torch
import torch.distributed

from fmtrain import hardware
from fmtrain.checkpoint import Checkpointer
from fmtrain.config import ConfigError, TrainConfig
from fmtrain.distributed import DistEnv
from fmtrain.manifests import run_dir_problem
from fmtrain.metrics import (
    MetricsWriter,
    NullMetrics,
    peak_flops_key,
    peak_memory_bytes,
    plot_losses,
    setup_logging,
    store_peak_flops,
    warm_imports,
    world_peak_flops,
)
from fmtrain.optim import lr_at
from fmtrain.signals import StopFlag
from fmtrain.step import Parts, StepOutcome, build, evaluate, train_step
from fmtrain.strategies import compute_dtype
from fmtrain.validation import validate
from fmtrain.watchdog import Watchdog

log = logging.getLogger("fmtrain")

EvalHook = Callable[[int, float, "Path | None"], None]
StepHook = Callable[[int], None]


@dataclass
class RunResult:
    status: str  # "completed" or "stopped" (a signal asked for a stop; the state was saved)
    step: int
    loss: float | None
    val_loss: float | None
    run_dir: str
    stop_signal: str = ""  # the signal this rank received, when stopped: SIGUSR2 = preemption or time limit


@dataclass
class TrainState:
    """Where the run is: saved in each checkpoint as ``trainer_state.json``."""

    step: int = 0  # optimizer steps taken
    consumed: int = 0  # samples drawn from the global sampler (it resumes from this alone)
    val_loss: float | None = None  # of this step, if it evaluated
    best_val_loss: float | None = None
    scaler: dict[str, Any] = field(default_factory=dict)  # the strategy's fp16 loss-scaler state, under its own key

    def as_dict(self) -> dict[str, Any]:
        fields = {"step": self.step, "consumed": self.consumed, "val_loss": self.val_loss}
        return fields | {"best_val_loss": self.best_val_loss, **self.scaler}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        known = ("step", "consumed", "val_loss", "best_val_loss")
        scaler = {k: v for k, v in saved.items() if k not in known}
        return cls(saved["step"], saved["consumed"], saved.get("val_loss"), saved.get("best_val_loss"), scaler)

    def evaluated(self, val_loss: float) -> None:
        self.val_loss = val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss


def config_hash(cfg: TrainConfig) -> str:
    """Hash of what determines the numbers: model, data, optimizer, seed and global batch."""
    relevant = {k: asdict(cfg)[k] for k in ("model", "data", "optim", "seed")}
    relevant["global_batch_size"] = cfg.trainer.global_batch_size
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(cfg: TrainConfig, on_eval: EvalHook | None = None, on_step: StepHook | None = None) -> RunResult:
    """Train according to ``cfg`` in this process, as one rank of the world in the environment.

    ``on_eval(step, val_loss, checkpoint)`` is called on rank 0 after each evaluation, with the
    checkpoint saved at that step if there is one (``fmtrain tune`` reports to Ray Tune through it).
    ``on_step(step)`` is called on every rank before each step (the worker injects test faults so).

    Raises:
        ConfigError: for a config that cannot run, as ``fmtrain train`` would refuse it (before
            anything is written), so a library caller never meets a KeyError from deep inside.
    """
    env = DistEnv.from_environ()
    validate(cfg, world_size=env.world_size)  # the world this rank is in (a launcher's is checked before it starts)
    stop = StopFlag()
    run_dir = Path(cfg.run_dir)
    if (problem := run_dir_problem(run_dir)) is not None:  # before training, not at the first save
        raise ConfigError("run_dir", cfg.run_dir, problem)
    setup_logging(run_dir, env.rank)
    log.info("rank %d of %d: node %d (%s), local rank %d", env.rank, env.world_size, env.node_rank, gethostname(), env.local_rank)
    # The process group's timeout: past the watchdog's, which speaks first (naming ranks, writing stacks).
    device = env.init(cfg.trainer.device, timeout_s=(cfg.trainer.hang_timeout_s or 1800) + 60)
    try:
        cfg = resolve_precision(cfg, env, device)
        return _train(cfg, env, device, run_dir, stop, on_eval, on_step)
    finally:
        env.close()


def resolve_precision(cfg: TrainConfig, env: DistEnv, device: torch.device) -> TrainConfig:
    """``cfg`` with ``precision=auto`` (the default) replaced by what this rank's device trains
    fastest in (:func:`fmtrain.hardware.resolve_precision`), agreed by every rank: bf16 only if all
    of them multiply bf16 natively. A precision the user named is kept as it is."""
    if cfg.precision.name != "auto":
        return cfg
    name, why = hardware.resolve_precision(device.type, cfg.strategy.name, "auto", device.index or 0)
    if env.distributed:
        everyone = torch.tensor(float(name == "bf16"), device=device)
        torch.distributed.all_reduce(everyone, op=torch.distributed.ReduceOp.MIN)
        if name == "bf16" and not everyone.item():
            name, why = "fp32", "another rank's device has no native bf16 matmuls"
    if env.is_main:
        log.info("precision=auto -> %s: %s (precision=fp32 or precision=bf16 fixes it)", name, why)
    return replace(cfg, precision=replace(cfg.precision, name=name))


def _train(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    run_dir: Path,
    stop: StopFlag,
    on_eval: EvalHook | None,
    on_step: StepHook | None,
) -> RunResult:
    t = cfg.trainer
    torch.manual_seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    p = build(cfg, env, device)
    if env.is_main:
        for name, text in p.strategy.files().items():
            (run_dir / name).write_text(text)
    checkpoints = Checkpointer(
        run_dir / "checkpoints",
        env,
        p.strategy,
        keep_last=cfg.checkpoint.keep_last,
        keep_best=cfg.checkpoint.keep_best,
        identity={"strategy": cfg.strategy.name, "config_hash": config_hash(cfg)},
        asynchronous=cfg.checkpoint.async_save,
    )
    watchdog = Watchdog(run_dir / "logs", env.rank, env.world_size, t.hang_timeout_s)
    try:
        watchdog.mark(0, "checkpoint")
        return _loop(cfg, p, checkpoints, watchdog, run_dir, stop, on_eval, on_step)
    finally:
        watchdog.stop()


def _loop(
    cfg: TrainConfig,
    p: Parts,
    checkpoints: Checkpointer,
    watchdog: Watchdog,
    run_dir: Path,
    stop: StopFlag,
    on_eval: EvalHook | None,
    on_step: StepHook | None,
) -> RunResult:
    t, env = cfg.trainer, p.env
    state = _restore(checkpoints, p)
    report = _Report(p, run_dir, start_step=state.step)

    def save() -> Path | None:
        watchdog.mark(state.step, "checkpoint")
        state.scaler = p.strategy.scaler_state(p.optimizer)
        return checkpoints.save(state.step, p.wrapped, p.optimizer, state.as_dict())

    warm_imports(plot=t.plot and env.is_main)
    status, loss, last_saved = "completed", None, state.step
    while state.step < t.max_steps:
        watchdog.mark(state.step, "start")
        checkpoints.poll()  # a checkpoint written in the background: completed once every rank's write is
        if on_step is not None:
            on_step(state.step)
        lr = lr_at(state.step, cfg.optim, t.max_steps)
        for group in p.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        watchdog.mark(state.step, "train")
        outcome = train_step(p, state.step, state.consumed, stop)
        state.step, state.consumed, loss = state.step + 1, state.consumed + t.global_batch_size, outcome.loss
        report.step(state.step, outcome, lr, time.perf_counter() - started)

        done = state.step == t.max_steps
        state.val_loss = None
        if state.step % t.eval_interval == 0 or done:
            watchdog.mark(state.step, "evaluate")
            val_loss = evaluate(p)
            state.evaluated(val_loss)
            report.evaluation(state.step, val_loss)
        saved = None
        if state.step % cfg.checkpoint.interval == 0 or done or outcome.stop_requested:
            saved, last_saved = save(), state.step
            if saved is None and on_eval is not None:
                saved = checkpoints.finish()  # fmtrain tune hands the checkpoint on: complete it now
        if on_eval is not None and env.is_main and state.val_loss is not None:
            on_eval(state.step, state.val_loss, saved)
        if outcome.stop_requested and not done:
            status = "stopped"
            log.warning("stop signal received: saved step %d; run the same command again to resume", state.step)
            break

    if state.step != last_saved:
        save()
    checkpoints.finish()  # the last checkpoint is complete before the run says it has ended
    report.close()
    stop_signal = signal.Signals(stop.signum).name if status == "stopped" and stop.signum else ""
    result = RunResult(status, state.step, loss, state.val_loss, str(run_dir), stop_signal)
    if env.is_main:
        if t.plot:
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _restore(checkpoints: Checkpointer, p: Parts) -> TrainState:
    """The newest valid checkpoint's state loaded into the model and optimizer, or a fresh start."""
    restored = checkpoints.choose(p.cfg.trainer.resume)
    if restored is None:
        return TrainState()
    state = TrainState.from_dict(checkpoints.load(restored, p.wrapped, p.optimizer))
    manifest = json.loads((restored / "manifest.json").read_text())
    if manifest["config_hash"] != config_hash(p.cfg):
        log.warning("resuming %s under a config whose model/data/optim/seed/batch differ from the saved one", restored)
    p.strategy.load_scaler_state(p.optimizer, state.scaler)
    log.info("resumed from %s at step %d", restored, state.step)
    return state


class _Report:
    """The run's metrics: a header line, one record per step (MFU, memory, loss scale), evaluations."""

    def __init__(self, p: Parts, run_dir: Path, *, start_step: int) -> None:
        cfg, env, t = p.cfg, p.env, p.cfg.trainer
        self.p = p
        self.peak = t.peak_flops or world_peak_flops(env, p.device, compute_dtype(cfg.precision.name))
        self.peak_exceeded = False
        # trainer.compile: the first step of this process compiles; its excess over the second is logged
        self.compile_timing: list[float] | None = [] if t.compile == "true" else None
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        log.info(
            "model %s (%s): %.2fM parameters, %.1f MFLOPs/token | %s, world %d (dp %d x tp %d), "
            "micro-batch %d x %d accumulation | %s on %s",
            cfg.model.name,
            cfg.model.arch,
            p.num_params / 1e6,
            p.flops_per_token / 1e6,
            cfg.strategy.name,
            env.world_size,
            p.strategy.dims.dp,
            p.strategy.dims.tp,
            p.micro,
            p.accum,
            cfg.precision.name,
            p.device,
        )
        if (niceness := os.nice(0)) > 0:  # a rank started under `nice`, or by a Ray that kept its default
            log.warning("this rank runs at nice %d: the node's other processes take the CPU before it", niceness)
        self.real_share: float | None = None  # fine-tuning examples: the share of real (not padding) tokens per row
        if "examples" in p.corpus.meta:  # fine-tuning examples, padded
            meta, width = p.corpus.meta, cfg.data.seq_len + 1
            tokens = p.corpus.train.num_tokens + p.corpus.val.num_tokens
            examples = meta["examples"]["train"] + meta["examples"]["val"]
            rows = p.corpus.train.num_windows(width) + p.corpus.val.num_windows(width)
            self.real_share = tokens / (rows * width)
            log.info(
                "data: %d examples (%d validation), %d target tokens; %d truncated, %d dropped (data.overlong=%s); "
                "data.packing=%s: %d rows of %d, %.1f%% real tokens (padding each alone: %.1f%%)",
                examples, meta["examples"]["val"], meta["targets"], meta["overlong"]["truncated"], meta["overlong"]["dropped"],
                cfg.data.overlong, cfg.data.packing, rows, width, 100 * tokens / (rows * width),
                100 * tokens / (examples * width),
            )  # fmt: skip
        self.bad_records = int(p.corpus.meta.get("bad_records", {}).get("count", 0))
        if self.bad_records:
            first = "; ".join(p.corpus.meta["bad_records"]["first"])
            log.warning("data: %d bad records left out (data.on_bad_record=skip), the first: %s", self.bad_records, first)
        self.metrics = (
            MetricsWriter(run_dir, start_step=start_step, max_steps=t.max_steps, progress=t.progress, log_interval=t.log_interval)
            if env.is_main
            else NullMetrics()
        )

    def _check_peak(self, achieved: float) -> None:
        """MFU is at most 1: a step faster than the peak means the peak was measured low (the probe ran
        on a busy CPU) or set low (``trainer.peak_flops``). The peak becomes what was achieved, and a
        probed peak is forgotten, so the next run on this machine measures it again."""
        if achieved <= self.peak:
            return
        if not self.peak_exceeded:
            self.peak_exceeded = True
            source = "trainer.peak_flops" if self.p.cfg.trainer.peak_flops else "the measured peak (probed again next run)"
            log.warning(
                "a step ran at %.3g FLOP/s, above %s of %.3g: MFU is reported against the former", achieved, source, self.peak
            )
            if not self.p.cfg.trainer.peak_flops and self.p.env.local_rank == 0:
                dtype = compute_dtype(self.p.cfg.precision.name)
                store_peak_flops(peak_flops_key(dtype, self.p.device, self.p.env.local_world_size), None)
        self.peak = achieved

    def _time_compile(self, elapsed: float) -> None:
        """Log how long compiling took: the first step (compile included) less the second."""
        assert self.compile_timing is not None
        self.compile_timing.append(elapsed)
        if len(self.compile_timing) == 2:
            first, second = self.compile_timing
            what = "trainer.compile: the first step took %.1f s, the second %.2f s: about %.1f s compiling"
            log.info(what, first, second, first - second)
            self.compile_timing = None

    def step(self, step: int, outcome: StepOutcome, lr: float, elapsed: float) -> None:
        if self.compile_timing is not None:
            self._time_compile(elapsed)
        tokens_per_s = self.tokens_per_step / elapsed
        self._check_peak(self.p.flops_per_token * tokens_per_s)
        scale = self.p.strategy.loss_scale(self.p.optimizer)
        self.metrics.log(
            {
                "step": step,
                "loss": outcome.loss,
                "lr": lr,
                "grad_norm": outcome.grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": self.p.flops_per_token * tokens_per_s / self.peak,
                "peak_mem_bytes": peak_memory_bytes(self.p.device),
                "state_bytes": outcome.state_bytes,
                "optim_state_bytes": outcome.optim_state_bytes,
                "step_time_s": elapsed,
                "skipped": outcome.skipped,
                **({"loss_scale": scale} if scale is not None else {}),
                **({"data_bad_records": self.bad_records} if self.bad_records else {}),
                **({"data_real_token_share": self.real_share} if self.real_share is not None else {}),
                "time": time.time(),
            }
        )
        self.metrics.progress(step, f"loss {outcome.loss:.4f} | {tokens_per_s:,.0f} tok/s")

    def evaluation(self, step: int, val_loss: float) -> None:
        self.metrics.log({"step": step, "val_loss": val_loss})
        log.info("step %d: val_loss %.4f", step, val_loss)

    def close(self) -> None:
        self.metrics.close()
