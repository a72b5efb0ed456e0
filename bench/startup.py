"""Start-up: wall time of ``fmtrain train trainer.max_steps=1`` vs a bare torchrun script.

    python bench/startup.py [--rounds 5]

Both start a launcher process (fmtrain's CLI with the elastic agent; torchrun) and one worker that
builds the same model and takes one step. fmtrain also composes and validates the config, opens the
cached data, restores/saves a checkpoint, evaluates and writes its run directory. The tokenized
data cache is warmed first: a first-ever run also tokenizes the corpus. Goal: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bare_cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=1", str(HERE / "bare_step.py")]
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fmtrain_cmd = [str(BIN / "fmtrain"), "train", "trainer.max_steps=1"]
        timed([*fmtrain_cmd, f"run_dir={tmp}/warm"])  # tokenize the corpus once, as any first run does
        for round_ in range(args.rounds):
            bare.append(timed(bare_cmd))
            ours.append(timed([*fmtrain_cmd, f"run_dir={tmp}/run{round_}"]))
            print(f"round {round_}: torchrun {bare[-1]:.2f}s, fmtrain {ours[-1]:.2f}s")
    ratio = common.median(ours) / common.median(bare)
    path = common.write(
        "startup",
        {
            "torchrun_s": bare,
            "fmtrain_s": ours,
            "median_torchrun_s": common.median(bare),
            "median_fmtrain_s": common.median(ours),
            "ratio": ratio,
            "goal": "<= 1.3",
        },
    )
    print(f"fmtrain / torchrun start-up: {ratio:.2f}  ->  {path}")


if __name__ == "__main__":
    main()
