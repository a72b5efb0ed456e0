"""``fmtrain tune tune=asha [OVERRIDES]``: a Ray Tune sweep, every trial an fmtrain run (see launch.tune)."""

from __future__ import annotations

from launch.commands import split_flags, usage
from launch.compose import UsageError, compose


def main(args: list[str]) -> int:
    """``fmtrain tune tune=asha [overrides]``: a Ray Tune sweep; every trial is an fmtrain run."""
    from fmtrain.config import ConfigError
    from fmtrain.validation import validate

    if "-h" in args or "--help" in args:
        print(usage())
        return 0
    flags, overrides = split_flags(args)
    if flags:
        raise UsageError(f"fmtrain tune takes no {' '.join(flags)}; the search space is tune.space")
    cfg = compose(overrides, check=False)
    if cfg.tune.name == "none":
        raise UsageError("choose a search: tune=asha | optuna | pbt | random | grid (see conf/tune/)")
    from launch.tune import check_trials, check_values, parse_space, run_sweep

    try:
        validate(cfg)
        check_values(cfg, parse_space(cfg.tune))
        check_trials(cfg)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    from launch.launchers import make_launcher
    from launch.spec import LaunchError

    try:
        make_launcher(cfg.launcher).preflight(cfg)  # the trials' launcher (a Slurm cluster), before Ray starts
    except LaunchError as error:
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
