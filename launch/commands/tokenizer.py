"""``fmtrain tokenizer train [DATA OVERRIDES...] tokenizer.vocab_size=N [tokenizer.min_frequency=M] out=DIR``:
a byte-level BPE trained on the configured data, written where ``data.tokenizer=DIR`` reads it."""

from __future__ import annotations

import json
from pathlib import Path

from launch.commands import split_flags
from launch.compose import UsageError, compose

USAGE = (
    "usage: fmtrain tokenizer train [data=jsonl data.paths=[...] ...] tokenizer.vocab_size=N [tokenizer.min_frequency=2] out=DIR"
)
OWN = ("tokenizer.vocab_size", "tokenizer.min_frequency", "out")


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help") or "-h" in args or "--help" in args:
        print(USAGE)
        return 0 if args else 2
    if args[0] != "train":
        raise UsageError(f"unknown tokenizer command {args[0]!r}; {USAGE}")
    numbers: dict[str, int] = {"tokenizer.vocab_size": 8192, "tokenizer.min_frequency": 2}
    out, overrides = "", []
    for arg in args[1:]:
        key, sep, value = arg.partition("=")
        if sep and key == "out":
            out = value
        elif sep and key in numbers:
            if not value.isdigit():
                raise UsageError(f"{key}={value!r} is invalid: must be a positive integer")
            numbers[key] = int(value)
        else:
            overrides.append(arg)
    if not out:
        raise UsageError(f"out=DIR is required: the folder to write the tokenizer to; {USAGE}")
    _, overrides = split_flags(overrides)
    if bad := [o for o in overrides if not o.lstrip("+~").startswith("data")]:
        raise UsageError(f"{bad[0]} is not a data setting; fmtrain tokenizer train takes data=..., data.*=..., {', '.join(OWN)}")
    from fmtrain.config import ConfigError
    from fmtrain.tokenizer_train import train_tokenizer
    from fmtrain.validation import validate_data

    cfg = compose(overrides, check=False)
    try:
        validate_data(cfg.data)
        record = train_tokenizer(cfg.data, numbers["tokenizer.vocab_size"], Path(out), numbers["tokenizer.min_frequency"])
    except ConfigError as error:
        raise UsageError(str(error)) from error
    print(json.dumps(record, indent=1))
    print(f"-> {out}  (train on it: data.tokenizer={out} model.vocab_size={record['vocab_size']})")
    return 0
