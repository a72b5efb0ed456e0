"""What a run reports: ``metrics.jsonl``, TensorBoard events, a progress display, a loss plot, the
logs of each rank, and the peak FLOP/s that MFU is measured against.

Rank 0 gets a :class:`MetricsWriter`; every other rank a :class:`NullMetrics` with the same
methods, so the trainer never branches on the rank to log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fmtrain.config import cache_root
from fmtrain.distributed import DistEnv
from fmtrain.hardware import cpu_name

log = logging.getLogger("fmtrain")

# Dense bf16 peak of known accelerators (FLOP/s), for MFU on GPUs. CPUs are measured instead.
NOT_PLOTTED = {"step", "time"}  # keys of a record that are no TensorBoard scalar
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def measure_peak_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.3) -> float:
    """FLOP/s of this process: a table for known GPUs, a square-matmul probe elsewhere.

    On CPU the probe runs with this process's thread count, so ranks that share the cores and
    probe at the same time each measure their share.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2
    n = 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def peak_flops_key(dtype: torch.dtype, device: torch.device, sharing: int) -> str:
    """What a cached probe result is for: the device, threads, ranks sharing it, dtype, torch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return f"{name}|threads={torch.get_num_threads()}|ranks={sharing}|{dtype}|torch={torch.__version__}"


def cached_peak_flops(dtype: torch.dtype, device: torch.device, sharing: int) -> tuple[str, float | None]:
    """The probe's earlier result on this machine (:func:`peak_flops_key`), and its key."""
    key = peak_flops_key(dtype, device, sharing)
    path = cache_root() / "peak_flops.json"
    try:
        return key, json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        return key, None


def store_peak_flops(key: str, value: float | None) -> None:
    """Keep the probe's result for ``key`` (None: forget it, so the next run measures again)."""
    path = cache_root() / "peak_flops.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Runs sharing the cache update it one at a time, so that none loses another's entry.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            known = {}
        if value is None:
            known.pop(key, None)
        else:
            known[key] = value
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class NullMetrics:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def progress(self, step: int, summary: str) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter(NullMetrics):
    """Writes records to ``metrics.jsonl`` and TensorBoard, and drives the progress display.

    ``resume_step``: records after it (left by an attempt that died after its last checkpoint)
    are dropped from the JSONL, and TensorBoard purges them, so each step appears once.
    """

    def __init__(self, run_dir: Path, *, start_step: int, max_steps: int, progress: bool, log_interval: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        kept = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.log_interval, self.max_steps = log_interval, max_steps
        self.bar = _RichBar(start_step, max_steps) if progress and sys.stdout.isatty() else None

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if (
                key not in NOT_PLOTTED
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self.tb.add_scalar(f"{'val' if key.startswith('val_') else 'train'}/{key}", value, step)

    def progress(self, step: int, summary: str) -> None:
        if self.bar is not None:
            self.bar.update(step, summary)
        elif step % self.log_interval == 0 or step == self.max_steps:
            log.info("step %d/%d  %s", step, self.max_steps, summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        self.tb.close()


class _RichBar:
    def __init__(self, start: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            transient=False,
        )
        self.task = self.progress.add_task("", total=total, completed=start)
        self.progress.start()

    def update(self, step: int, summary: str) -> None:
        self.progress.update(self.task, completed=step, description=summary)

    def close(self) -> None:
        self.progress.stop()


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Training and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


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


_WORLD_PEAKS: dict[tuple[str, str, int], float] = {}  # this process's answers: trainer.compile=auto and MFU both ask


def world_peak_flops(env: DistEnv, device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of the whole world: every rank probes at once and the results are summed.

    The probe's result is cached per machine (CPU, threads, ranks sharing it, dtype), so only the
    first run on a machine pays for it; a process asking again gets its first answer, with no cache
    read or collective (every rank asks in the same order).
    """
    asked = (str(cache_root()), peak_flops_key(dtype, device, env.local_world_size), env.world_size)
    if asked in _WORLD_PEAKS:
        return _WORLD_PEAKS[asked]
    key, cached = cached_peak_flops(dtype, device, env.local_world_size)
    need = torch.tensor(float(cached is None), device=device)
    if env.distributed:
        torch.distributed.all_reduce(need)
    if need.item():
        cached = measure_peak_flops(dtype, device)
        if env.local_rank == 0:
            store_peak_flops(key, cached)
    mine = torch.tensor(cached, dtype=torch.float64, device=device)
    if env.distributed:
        torch.distributed.all_reduce(mine)
    _WORLD_PEAKS[asked] = float(mine)
    return _WORLD_PEAKS[asked]


def warm_imports(plot: bool) -> None:
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
