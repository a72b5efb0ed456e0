"""``fmtrain export RUN_DIR [--step N] [--dtype fp32|bf16] [--format hf|fmtrain] [--max-shard-size SIZE] [--out DIR]``:
a checkpoint as a Hugging Face model directory, verified by loading it back."""

from __future__ import annotations

from pathlib import Path

from launch.compose import UsageError


def main(args: list[str]) -> int:
    """``fmtrain export RUN_DIR [--step N] [--dtype fp32|bf16] [--format hf|fmtrain] [--max-shard-size SIZE] [--out DIR]``."""
    import argparse

    from fmtrain.export import FORMATS, parse_size
    from fmtrain.manifests import CheckpointError

    parser = argparse.ArgumentParser(
        prog="fmtrain export",
        description="Write a checkpoint as a model directory that transformers loads (config.json, safetensors, tokenizer), "
        "with verification.json: its logits as loaded vs the checkpoint's.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest valid one)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--format", choices=FORMATS, default="hf", help="hf: Hugging Face names and layout (default); fmtrain: the model's own"
    )
    parser.add_argument(
        "--max-shard-size", type=parse_size, default="5GB", help="split model.safetensors above this (default 5GB)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/export/step_<N>, replaced)")
    try:
        options = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if not (options.run_dir / "config.yaml").is_file():
        raise UsageError(f"{options.run_dir} is not a run directory (no config.yaml)")
    from fmtrain.export import export as export_checkpoint

    try:
        out = export_checkpoint(options.run_dir, options.step, options.dtype, options.out, options.format, options.max_shard_size)
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    print(out)
    return 0
