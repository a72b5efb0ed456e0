"""``fmtrain plan [--json] [world_size=N] OVERRIDES``: per-rank memory of a plan, from the meta device."""

from __future__ import annotations

import json

from launch.commands import split_flags, usage
from launch.compose import UsageError, compose


def main(args: list[str]) -> int:
    """Per-rank memory of a plan, from the meta device: ``fmtrain plan [--json] [world_size=N] ...``."""
    from fmtrain.config import ConfigError
    from fmtrain.plan import make_plan
    from fmtrain.validation import validate

    if "-h" in args or "--help" in args:
        print(usage())
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
    split_flags(overrides)  # refuses unknown options
    cfg = compose(overrides, check=False)
    world = world or cfg.launcher.nproc
    try:
        validate(cfg, world_size=world)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    result = make_plan(cfg, world)
    print(json.dumps(result.as_dict(), indent=1) if as_json else result.table())
    return 0
