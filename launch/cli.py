"""The ``fmtrain`` command.

    fmtrain train [OVERRIDES...]                 train (local launcher by default)
    fmtrain train -m optim.lr=1e-3,3e-4          one run per value (Hydra multirun)
    fmtrain train --cfg job [OVERRIDES...]       print the composed config and exit
    fmtrain train launcher=slurm ... [--dry-run] submit to Slurm (--dry-run: print the sbatch script)
    fmtrain train launcher=ray launcher.submit=jobs launcher.address=http://HEAD:8265   Ray Jobs API
    fmtrain status RUN_DIR|JOB_ID                state, steps done and last loss of a run
    fmtrain logs RUN_DIR|JOB_ID [-f] [--rank R]  a run's log (-f: follow until the job ends)
    fmtrain cancel RUN_DIR|JOB_ID                stop a running or queued job

A JOB_ID is a Ray Jobs submission id, looked up on the cluster at $RAY_ADDRESS (its dashboard URL).
    fmtrain plan model=8b strategy=fsdp world_size=64   per-rank memory of a plan, nothing allocated

Every override is checked (for a sweep: every combination) before anything starts. A refused command
line prints one message naming the field, the value and the valid choices, and exits with code 2.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

from launch.compose import UsageError, compose, conf_dir, expand_sweep, group_options

USAGE = """usage: fmtrain <command> [options] [key=value ...]

commands:
  train     train a model:  fmtrain train model=tiny trainer.max_steps=200 launcher.nproc=2
  status    show a run's state, steps done and last loss:  fmtrain status RUN_DIR
  logs      show a run's log:  fmtrain logs RUN_DIR [-f] [--rank R]
  cancel    stop a run's job (Slurm: scancel; local: SIGTERM, it saves first):  fmtrain cancel RUN_DIR
            (for a Ray Jobs submission, RUN_DIR may be its id, with RAY_ADDRESS=http://HEAD:8265)
  export    a checkpoint as model.safetensors + config.json:  fmtrain export RUN_DIR [--step N] [--dtype bf16]
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

log = logging.getLogger("fmtrain.launch")


def _usage() -> str:
    groups = "\n".join(f"  {name:<10} {', '.join(options)}" for name, options in group_options().items())
    return USAGE.format(groups=groups)


def _split(args: list[str]) -> tuple[list[str], list[str]]:
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
            overrides.append(arg)
        i += 1
    return flags, overrides


def _gpus_available() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_train(overrides: list[str], multirun: bool, dry_run: bool = False) -> int:
    """Compose and validate every job the command line asks for (and for Slurm, check the request
    against the cluster); return how many jobs there are."""
    checked: set[str] = set()
    jobs = expand_sweep(overrides)
    if len(jobs) > 1 and not multirun:
        raise UsageError(f"{' '.join(overrides)} describes a sweep of {len(jobs)} runs; add -m to run them all")
    from fmtrain.config import ConfigError
    from fmtrain.validation import validate

    gpus = None
    for job in jobs:
        cfg = compose(job, check=False)
        if gpus is None and cfg.trainer.device != "cpu":
            gpus = _gpus_available()
        try:
            validate(cfg, gpus_available=gpus)
        except ConfigError as error:
            raise UsageError(str(error) + (f"  (in run {' '.join(job)})" if len(jobs) > 1 else "")) from error
        if cfg.launcher.name == "slurm" and not dry_run and repr(cfg.launcher) not in checked:
            from launch.slurm import SlurmError, check_against_cluster

            try:
                check_against_cluster(cfg.launcher)  # before Hydra writes run directories
            except SlurmError as error:
                raise UsageError(str(error)) from error
            checked.add(repr(cfg.launcher))
    return len(jobs)


_exit_codes: list[int] = []
_queued: list = []  # RunSpecs for launchers that submit after Hydra has composed every run (Slurm)


def _train_task(node: object) -> None:
    """Hydra's task function: one run (one job of a sweep) from composition to the end."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from fmtrain.config import to_config
    from launch.launchers import make_launcher
    from launch.spec import RunSpec

    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    container = OmegaConf.to_container(node, resolve=True)
    assert isinstance(container, dict)
    container["run_dir"] = str(run_dir)
    cfg = to_config(container)
    spec = RunSpec(cfg, run_dir, argv=["fmtrain", "train", *sys.argv[1:]])
    spec.write()
    log.info("run directory: %s", run_dir)
    if cfg.launcher.name == "slurm":
        _queued.append(spec)  # submitted together, as one job array for a sweep
        return
    job = make_launcher(cfg.launcher.name).launch(spec)
    if cfg.launcher.name == "ray" and cfg.launcher.submit == "jobs":
        from launch.spec import JobRecord

        print(f"{JobRecord.read(run_dir).job_id}\t{run_dir}")  # the Ray Jobs submission id
        return
    result = job.result()
    if result["message"]:
        (log.error if result["state"] == "failed" else log.warning)("%s", result["message"])
    log.info("%s: %s", result["state"], run_dir)
    _exit_codes.append(int(result["exit_code"] or 0))


def train(args: list[str]) -> int:
    from fmtrain.config import register_schema

    if "-h" in args or "--help" in args:
        print(_usage())
        return 0
    flags, overrides = _split(args)
    multirun = "-m" in flags or "--multirun" in flags
    check_train(overrides, multirun, dry_run="--dry-run" in flags)
    if "--dry-run" in flags:
        return _dry_run(overrides)
    flags = [f for f in flags if f not in FMTRAIN_FLAGS]

    import hydra

    register_schema()
    sys.argv = ["fmtrain train", *flags, *overrides]
    app = hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)(_train_task)
    app()
    if _queued:
        _submit_queued(multirun)
    failed = [code for code in _exit_codes if code]
    return failed[0] if failed else 0


def _submit_queued(multirun: bool) -> None:
    from fmtrain.config import world_size_of
    from fmtrain.plan import make_plan
    from launch.slurm import SlurmError, SlurmLauncher

    root = _queued[0].run_dir.parent if multirun else _queued[0].run_dir
    cfg = _queued[0].config
    log.info("plan per rank:\n%s", make_plan(cfg, world_size_of(cfg.launcher)).table())
    try:
        jobs = SlurmLauncher().launch_all(list(_queued), root=root)
    except SlurmError as error:
        raise UsageError(str(error)) from error
    for job in jobs:
        print(f"{job.record.job_id}\t{job.run_dir}")


def _dry_run(overrides: list[str]) -> int:
    """Print what would run: the resolved config of each job, and the sbatch script for Slurm."""
    from fmtrain.config import to_yaml

    jobs = expand_sweep(overrides)
    configs = [compose(job) for job in jobs]
    for job, cfg in zip(jobs, configs, strict=True):
        print(f"# config ({' '.join(job)})\n{to_yaml(cfg)}")
    from fmtrain.config import world_size_of
    from fmtrain.plan import make_plan

    print(f"# plan per rank\n{make_plan(configs[0], world_size_of(configs[0].launcher)).table()}\n")
    if configs[0].launcher.name == "slurm":
        from launch.slurm import SlurmError, check_against_cluster, render_sbatch

        lc = configs[0].launcher
        root = Path(configs[0].run_dir).resolve()
        root = root.parent if len(jobs) > 1 else root
        print("# sbatch script (submitit fills in %j)")
        print(
            render_sbatch(
                lc, root / "slurm", root / "code" if lc.code_snapshot else None, array=len(jobs) if len(jobs) > 1 else None
            )
        )
        try:
            check_against_cluster(lc)
        except SlurmError as error:
            print(f"# not submittable here: {error}")
    print("# dry run: nothing started, nothing submitted")
    return 0


def status(args: list[str]) -> int:
    from fmtrain.metrics import read_jsonl
    from launch.spec import ForegroundJob, JobRecord

    run_dir = _run_dir(args, "fmtrain status RUN_DIR|JOB_ID")
    if not (run_dir / "job.json").is_file():  # a Ray job whose run directory this machine cannot see
        return _print_remote_ray_job(args[0])
    record = JobRecord.read(run_dir)
    if record.launcher == "local":
        record = ForegroundJob(run_dir).record()  # a killed launcher's "running" is corrected
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    summary = {
        "run_dir": str(run_dir),
        "launcher": record.launcher,
        "state": record.state,
        "job_id": record.job_id,
        "attempts": record.attempts,
        "step": train_records[-1]["step"] if train_records else 0,
        "loss": train_records[-1]["loss"] if train_records else None,
        "val_loss": val_records[-1]["val_loss"] if val_records else None,
        "started": record.started,
        "ended": record.ended,
        "message": record.message,
    }
    if record.launcher == "slurm":
        from launch.slurm import REQUEUES, scheduler_state

        summary["scheduler_state"] = scheduler_state(record.job_id)
        requeues = read_jsonl(run_dir / REQUEUES) if (run_dir / REQUEUES).is_file() else []
        summary["requeues"] = len([r for r in requeues if r["requeued"]])
        if train_records and "invoked_at" in record.extra:
            first = train_records[0]
            if first["step"] == 1:
                summary["submit_to_first_step_s"] = round(first["time"] - record.extra["invoked_at"], 2)
    from launch.ray import RayJob

    ray_job = RayJob.of(run_dir) if record.launcher == "ray" else None
    if ray_job is not None:
        summary["scheduler_state"] = ray_job.scheduler_state()
        if record.state in ("pending", "running"):  # a driver that was stopped or killed could not say so itself
            summary["state"] = ray_job.state()
    print(json.dumps(summary, indent=1))
    return 0


def _print_remote_ray_job(submission_id: str) -> int:
    from launch.ray import JOB_STATES, find_submission

    info = find_submission(os.environ["RAY_ADDRESS"], submission_id)
    summary = {
        "job_id": submission_id,
        "launcher": "ray",
        "state": JOB_STATES[str(info.status.value)],
        "scheduler_state": str(info.status.value),
        "run_dir": (info.metadata or {}).get("run_dir", ""),
        "message": info.message or "",
    }
    print(json.dumps(summary, indent=1))
    return 0


def _run_dir(args: list[str], usage: str) -> Path:
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


def cancel(args: list[str]) -> int:
    from launch.ray import RayJob
    from launch.slurm import SlurmJob
    from launch.spec import ForegroundJob, JobRecord

    run_dir = _run_dir(args, "fmtrain cancel RUN_DIR|JOB_ID")
    if not (run_dir / "job.json").is_file():  # a Ray job whose run directory this machine cannot see
        RayJob(run_dir, args[0], os.environ["RAY_ADDRESS"]).cancel()
        print(f"cancelled ray job {args[0]}")
        return 0
    record = JobRecord.read(run_dir)
    ray_job = RayJob.of(run_dir) if record.launcher == "ray" else None
    job = SlurmJob(run_dir) if record.launcher == "slurm" else ray_job or ForegroundJob(run_dir)
    job.cancel()
    print(f"cancelled {record.launcher} job {record.job_id}: {run_dir}")
    return 0


def logs(args: list[str]) -> int:
    """``fmtrain logs RUN_DIR|JOB_ID [-f] [--rank R]``: rank R's log (and its scheduler output for Slurm);
    for a Ray Jobs submission without ``--rank``, the job driver's log as the Jobs API keeps it."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="fmtrain logs")
    parser.add_argument("run_dir")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    parser.add_argument("--rank", type=int, default=None)
    try:
        options = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    run_dir = _run_dir([options.run_dir], "fmtrain logs RUN_DIR|JOB_ID [-f] [--rank R]")
    from launch.ray import TERMINAL_JOB_STATES, RayJob
    from launch.spec import JobRecord

    visible = (run_dir / "job.json").is_file()
    ray_job = RayJob.of(run_dir) if visible else RayJob(run_dir, options.run_dir, os.environ["RAY_ADDRESS"])
    if ray_job is not None and options.rank is None:
        printed = 0
        while True:
            done = ray_job.scheduler_state() in TERMINAL_JOB_STATES  # read before the log: nothing is missed
            text = ray_job.driver_log()
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
            if done or not options.follow:
                return 0
            time.sleep(1.0)
    rank = options.rank or 0

    def files() -> list[Path]:
        record = JobRecord.read(run_dir)
        found = [run_dir / "logs" / f"rank{rank}.log"]
        if record.launcher == "slurm" and record.job_id:
            folder = Path(record.extra.get("slurm_folder", run_dir / "slurm"))
            found = sorted(folder.glob(f"**/{record.job_id}_{rank}_log.*")) + found
        return [f for f in found if f.is_file()]

    offsets: dict[Path, int] = {}

    def dump() -> None:
        for file in files():
            with open(file, errors="replace") as f:
                f.seek(offsets.get(file, 0))
                text = f.read()
                offsets[file] = f.tell()
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()

    dump()
    while options.follow and _job_running(run_dir):
        time.sleep(1.0)
        dump()
    if options.follow:
        dump()
    return 0


def _job_running(run_dir: Path) -> bool:
    from launch.spec import ForegroundJob, JobRecord

    record = JobRecord.read(run_dir)
    if record.launcher == "slurm":
        from launch.slurm import TERMINAL, scheduler_state

        return scheduler_state(record.job_id) not in TERMINAL
    from launch.ray import RayJob

    ray_job = RayJob.of(run_dir) if record.launcher == "ray" else None
    if ray_job is not None:
        return ray_job.state() in ("pending", "running")
    return ForegroundJob(run_dir).state() == "running"


def plan(args: list[str]) -> int:
    """Per-rank memory of a plan, from the meta device: ``fmtrain plan [--json] [world_size=N] ...``."""
    from fmtrain.config import ConfigError
    from fmtrain.plan import make_plan
    from fmtrain.validation import validate

    if "-h" in args or "--help" in args:
        print(_usage())
        return 0
    as_json = "--json" in args
    overrides, world = [], None
    for arg in args:
        if arg.startswith("world_size="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"world_size={value!r} is invalid: must be a positive integer")
            world = int(value)
        elif arg != "--json":
            overrides.append(arg)
    _split(overrides)  # refuses unknown options
    cfg = compose(overrides, check=False)
    world = world or cfg.launcher.nproc
    try:
        validate(cfg, world_size=world)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    result = make_plan(cfg, world)
    print(json.dumps(result.as_dict(), indent=1) if as_json else result.table())
    return 0


def export(args: list[str]) -> int:
    """``fmtrain export RUN_DIR [--step N] [--dtype fp32|bf16] [--out DIR]``."""
    import argparse

    from fmtrain.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="fmtrain export", description="Write a checkpoint as model.safetensors + config.json.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest valid one)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/export/step_<N>)")
    try:
        options = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if not (options.run_dir / "config.yaml").is_file():
        raise UsageError(f"{options.run_dir} is not a run directory (no config.yaml)")
    from fmtrain.export import export as export_checkpoint

    try:
        out = export_checkpoint(options.run_dir, options.step, options.dtype, options.out)
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    print(out)
    return 0


def tune(args: list[str]) -> int:
    """``fmtrain tune tune=asha [overrides]``: a Ray Tune sweep; every trial is an fmtrain run."""
    from fmtrain.config import ConfigError
    from fmtrain.validation import validate

    if "-h" in args or "--help" in args:
        print(_usage())
        return 0
    flags, overrides = _split(args)
    if flags:
        raise UsageError(f"fmtrain tune takes no {' '.join(flags)}; the search space is tune.space")
    cfg = compose(overrides, check=False)
    if cfg.tune.name == "none":
        raise UsageError("choose a search: tune=asha | optuna | pbt | random | grid (see conf/tune/)")
    from launch.tune import check_trials, parse_space, run_sweep

    try:
        validate(cfg)
        parse_space(cfg.tune)
        check_trials(cfg)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    if cfg.launcher.name == "slurm":
        from launch.slurm import SlurmError, check_against_cluster

        try:
            check_against_cluster(cfg.launcher)  # before Ray starts
        except SlurmError as error:
            raise UsageError(str(error)) from error
    base = [o for o in overrides if not o.lstrip("+~").startswith(("tune", "run_dir"))]
    try:
        sweep_dir = run_sweep(cfg, ["fmtrain", "tune", *args], base)
    except ConfigError as error:  # a request the Ray cluster cannot hold, found once it is up
        raise UsageError(str(error)) from error
    print((sweep_dir / "results.csv").read_text(), end="")
    if (sweep_dir / "best_command.txt").is_file():
        print(f"best: {(sweep_dir / 'best_command.txt').read_text().strip()}")
    print(f"sweep directory: {sweep_dir}")
    return 0


COMMANDS = {"train": train, "tune": tune, "status": status, "logs": logs, "cancel": cancel, "plan": plan, "export": export}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("FMTRAIN_INVOKED_AT", repr(time.time()))  # submit-to-first-step latency
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from fmtrain import __version__

        print(f"fmtrain {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            raise UsageError(f"unknown command {argv[0]!r}; valid commands are {', '.join(COMMANDS)}")
        return command(argv[1:])
    except UsageError as error:
        print(f"fmtrain: error: {error}", file=sys.stderr)
        return 2


def entry() -> None:
    code = main()
    gc.freeze()  # skip the interpreter's final collection over torch's heap (~0.3 s); all is closed
    sys.exit(code)
