"""Time the training loop is blocked per checkpoint: ``checkpoint.async=true`` vs the synchronous save,
for a model whose checkpoint is over 100 MB (``model=small``: 26M parameters, ~310 MB with AdamW's
state); and the step-time cost of the hang watchdog (``trainer.hang_timeout_s=0`` turns it off).

    python bench/checkpoint_async.py        # writes results/checkpoint_async.json

Blocked time is what fmtrain logs per save: the whole save when synchronous; when asynchronous, the
copy of the state plus any wait for the previous write at the next save. The ratio compares the
saves during training; the last one, which the run waits for before it ends (nothing is left to
overlap it with), is reported apart. Rounds alternate the two modes in one run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import fmtrain_throughput, median, write

FMTRAIN = str(Path(sys.executable).parent / "fmtrain")
BASE = ["data.seq_len=64", "data.max_bytes=3000000", "trainer.global_batch_size=4", "trainer.eval_batches=1"]
BASE += ["trainer.plot=false", "trainer.progress=false"]
CHECKPOINTS = [
    "model=small",
    "trainer.max_steps=16",
    "trainer.eval_interval=16",
    "checkpoint.interval=4",
    "checkpoint.keep_last=2",
]
SAVED = re.compile(r"saved checkpoint \S+ in ([\d.]+)s$")
WAITED = re.compile(r"written in the background: training waited ([\d.]+)s$")


def run(run_dir: Path, overrides: list[str]) -> str:
    result = subprocess.run([FMTRAIN, "train", f"run_dir={run_dir}", *BASE, *overrides], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)
    return (run_dir / "logs" / "rank0.log").read_text()


def blocked_per_save(log: str, asynchronous: bool) -> list[float]:
    pattern = WAITED if asynchronous else SAVED
    return [float(m.group(1)) for line in log.splitlines() if (m := pattern.search(line))]


def main(rounds: int = 2) -> None:
    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    final: dict[str, list[float]] = {"sync": [], "async": []}
    size_mb = 0.0
    with tempfile.TemporaryDirectory(prefix="fmtrain-bench-") as tmp:
        for index in range(rounds):
            for mode in ("sync", "async"):
                run_dir = Path(tmp) / f"{mode}{index}"
                log = run(run_dir, [*CHECKPOINTS, f"checkpoint.async={str(mode == 'async').lower()}"])
                *during, last = blocked_per_save(log, mode == "async")
                blocked[mode] += during
                final[mode].append(last)
                step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
                size_mb = sum(f.stat().st_size for f in step.rglob("*") if f.is_file()) / 2**20
        throughput: dict[str, list[float]] = {"watchdog": [], "none": []}
        for index in range(3):
            for mode, timeout in (("none", "0"), ("watchdog", "1800")):
                run_dir = Path(tmp) / f"dog-{mode}{index}"
                run(run_dir, ["trainer.max_steps=120", "trainer.eval_interval=120", f"trainer.hang_timeout_s={timeout}"])
                throughput[mode].append(fmtrain_throughput(run_dir, warmup=10))
    ratio = median(blocked["async"]) / median(blocked["sync"])
    overhead = 1 - median(throughput["watchdog"]) / median(throughput["none"])
    path = write(
        "checkpoint_async",
        {
            "checkpoint_mb": round(size_mb, 1),
            "blocked_s": blocked,
            "median_sync_s": median(blocked["sync"]),
            "median_async_s": median(blocked["async"]),
            "final_save_s": final,
            "ratio": ratio,
            "goal": "<= 0.10",
            "tokens_per_s": throughput,
            "watchdog_overhead": overhead,
            "watchdog_goal": "< 0.01",
        },
    )
    print(f"checkpoint {size_mb:.0f} MB: blocked {median(blocked['sync']):.3f} s sync, {median(blocked['async']):.3f} s async")
    print(f"the last save (waited for at the end): {median(final['sync']):.3f} s sync, {median(final['async']):.3f} s async")
    print(f"ratio {ratio:.3f} (goal <= 0.10); watchdog overhead {overhead:+.2%} (goal < 1%) -> {path}")


if __name__ == "__main__":
    main()
