"""What the commands share: the usage text, telling flags from overrides, finding a run directory.

Each verb of ``fmtrain`` is a module here with ``main(args) -> exit code``; ``launch.cli`` only
dispatches. A user error is a :class:`~launch.compose.UsageError`: exit 2 with one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from launch.compose import UsageError, group_options, unalias

USAGE = """usage: fmtrain <command> [options] [key=value ...]

commands:
  train     train a model:  fmtrain train model=tiny trainer.max_steps=200 launcher.nproc=2
  status    show a run's state, steps done and last loss:  fmtrain status RUN_DIR
  logs      show a run's log:  fmtrain logs RUN_DIR [-f] [--rank R]
  cancel    stop a run's job (Slurm: scancel; local: SIGTERM, it saves first):  fmtrain cancel RUN_DIR
            (for a Ray Jobs submission, RUN_DIR may be its id, with RAY_ADDRESS=http://HEAD:8265)
  export    a checkpoint as a Hugging Face model directory:  fmtrain export RUN_DIR [--step N] [--dtype bf16] [--format fmtrain]
  tokenizer train a byte-level BPE on the configured data, for data.tokenizer=DIR:
            fmtrain tokenizer train data=jsonl data.paths=[corpus.jsonl] tokenizer.vocab_size=8192 out=tok
  tune      a Ray Tune sweep, every trial an fmtrain run:  fmtrain tune tune=asha tune.num_samples=8
  plan      per-rank memory of a plan, allocating nothing:
            fmtrain plan model=8b strategy=fsdp_tp strategy.tp=8 world_size=4096 [--json]

train options:
  -m, --multirun      one run per combination of comma-separated values (a sweep)
  --cfg job|all       print the composed config instead of running
  --resolve           with --cfg: resolve interpolations
  --dry-run           validate, print the resolved config (and for launcher=slurm the sbatch script);
                      start and submit nothing

config groups (choose with GROUP=OPTION):
{groups}
any field is overridable:  trainer.max_steps=500  optim.lr=1e-3  run_dir=PATH  (fmtrain train --cfg job
shows them all)
"""


HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd"}

HYDRA_FLAGS = {"-m", "--multirun", "--resolve", "--info", "-i"}

FMTRAIN_FLAGS = {"--dry-run"}


def usage() -> str:
    groups = "\n".join(f"  {name:<10} {', '.join(options)}" for name, options in group_options().items())
    return USAGE.format(groups=groups)


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's flags from overrides."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg in HYDRA_FLAGS_WITH_VALUE and i + 1 < len(args):
            flags += args[i : i + 2]
            i += 2
            continue
        if arg in HYDRA_FLAGS or arg in FMTRAIN_FLAGS or arg.startswith("--cfg="):
            flags.append(arg)
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg}; see fmtrain --help")
        else:
            overrides.append(unalias(arg))
        i += 1
    return flags, overrides


def run_dir_of(args: list[str], usage: str) -> Path:
    """RUN_DIR, or a Ray Jobs submission id (on the cluster at $RAY_ADDRESS) -> its run directory.

    The directory of a Ray job may not be visible here (no shared storage): then it has no job.json
    and callers fall back on what the Jobs API says."""
    if len(args) != 1 or args[0].startswith("-"):
        raise UsageError(f"usage: {usage}")
    run_dir = Path(args[0])
    if (run_dir / "job.json").is_file():
        return run_dir
    if "/" not in args[0] and os.environ.get("RAY_ADDRESS"):
        from launch.ray import RayError, find_submission

        try:
            info = find_submission(os.environ["RAY_ADDRESS"], args[0])
        except RayError as error:
            raise UsageError(f"{args[0]} is neither a run directory (no job.json) nor a Ray job: {error}") from error
        return Path((info.metadata or {}).get("run_dir", ""))
    hint = "" if "/" in args[0] else " (for a Ray Jobs id, set RAY_ADDRESS to the cluster's dashboard URL)"
    raise UsageError(f"{run_dir} is not a run directory (no job.json){hint}")
