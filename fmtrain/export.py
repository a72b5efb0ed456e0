"""Export a run's checkpoint as one consolidated safetensors file plus its config.

    fmtrain export RUN_DIR [--step N] [--dtype fp32|bf16] [--out DIR]

The output (``RUN_DIR/export/step_<N>/`` by default) has a Hugging Face-style layout:
``model.safetensors`` (tensor names as in the model of ``model.arch``; a tied weight is stored once,
its other names in the file's ``aliases`` metadata) and ``config.json`` (the spec's
:meth:`~fmtrain.models.spec.ModelSpec.export_config`, Llama-style names for Llama, plus fmtrain's own
model config). It loads in one process without
torch.distributed, whatever strategy and world size wrote the checkpoint:

    model = load_exported("outputs/default/run/export/step_000120")
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fmtrain import models
from fmtrain.checkpoint import single_process_dcp
from fmtrain.config import ModelConfig, load
from fmtrain.manifests import CheckpointError, newest_valid, step_dir_name, verify
from fmtrain.strategies import DTYPES


def _plain_model(cfg: ModelConfig) -> nn.Module:
    spec = models.get(cfg.arch)
    with torch.device("meta"):
        model = spec.build(cfg)
    model.to_empty(device="cpu")
    spec.init_buffers(model)  # the weights come from the checkpoint: drawing an init would be wasted
    return model


def load_checkpoint_model(checkpoint: Path, cfg: ModelConfig) -> nn.Module:
    """The model of a DCP checkpoint, resharded into one plain process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    model = _plain_model(cfg)
    state = {"model": model.state_dict()}
    with single_process_dcp():
        dcp.load(state, checkpoint_id=checkpoint / "model_optim", planner=DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state["model"])
    return model


def export_config(cfg: ModelConfig, dtype: str, step: int) -> dict:
    spec = models.get(cfg.arch)
    return spec.export_config(cfg) | {
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "tokenizer": "bytes",
        "fmtrain": {"model": asdict(cfg), "step": step},
    }


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied weights: each later name of a tensor -> its first name (safetensors stores a tensor once)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def export(run_dir: Path, step: int | None = None, dtype: str = "fp32", out: Path | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` for one checkpoint of ``run_dir``; return the folder."""
    from safetensors.torch import save_file

    if step is None:
        checkpoint = newest_valid(run_dir / "checkpoints")
        if checkpoint is None:
            raise CheckpointError(f"{run_dir}/checkpoints: no valid checkpoint to export")
    else:
        checkpoint = run_dir / "checkpoints" / step_dir_name(step)
        if not checkpoint.is_dir():
            raise CheckpointError(f"{checkpoint}: no such checkpoint")
    manifest = verify(checkpoint)
    run_cfg = load(run_dir / "config.yaml")
    models.import_modules(run_cfg.imports)
    cfg = run_cfg.model
    model = load_checkpoint_model(checkpoint, cfg)
    aliases = _aliases(model)
    tensors = {name: t.to(DTYPES[dtype]).contiguous() for name, t in model.state_dict().items() if name not in aliases}
    out = out or run_dir / "export" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "step": str(manifest["step"]), "aliases": json.dumps(aliases)}
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    (out / "config.json").write_text(json.dumps(export_config(cfg, dtype, manifest["step"]), indent=1) + "\n")
    return out


def load_exported(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The plain model of an exported folder (a model of your own: import its module first)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = ModelConfig(**json.loads((directory / "config.json").read_text())["fmtrain"]["model"])
    model = _plain_model(cfg)
    tensors = load_file(str(directory / "model.safetensors"))
    tensors |= {alias: tensors[name] for alias, name in _aliases(model).items() if alias not in tensors}
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    return model.to(dtype)
