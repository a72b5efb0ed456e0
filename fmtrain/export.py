"""Export a run's checkpoint as one consolidated safetensors file plus its config.

    fmtrain export RUN_DIR [--step N] [--dtype fp32|bf16] [--out DIR]

The output (``RUN_DIR/export/step_<N>/`` by default) has a Hugging Face-style layout:
``model.safetensors`` (tensor names as in :class:`fmtrain.model.Transformer`) and ``config.json``
(Llama-style names plus fmtrain's own model config). It loads in one process without
torch.distributed, whatever strategy and world size wrote the checkpoint:

    model = load_exported("outputs/default/run/export/step_000120")
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from fmtrain.checkpoint import CheckpointError, newest_valid, single_process_dcp, step_dir_name, verify
from fmtrain.config import ModelConfig, load
from fmtrain.model import Transformer, ffn_hidden_dim
from fmtrain.strategies import DTYPES


def _plain_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_buffers()  # the weights come from the checkpoint: drawing an init would be wasted
    return model


def load_checkpoint_model(checkpoint: Path, cfg: ModelConfig) -> Transformer:
    """The model of a DCP checkpoint, resharded into one plain process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    model = _plain_model(cfg)
    state = {"model": model.state_dict()}
    with single_process_dcp():
        dcp.load(state, checkpoint_id=checkpoint / "model_optim", planner=DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state["model"])
    return model


def hf_config(cfg: ModelConfig, dtype: str, step: int) -> dict:
    return {
        "architectures": ["FmtrainTransformer"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "intermediate_size": ffn_hidden_dim(cfg),
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "tokenizer": "bytes",
        "fmtrain": {"model": asdict(cfg), "step": step},
    }


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
    cfg = load(run_dir / "config.yaml").model
    model = load_checkpoint_model(checkpoint, cfg)
    tensors = {name: t.to(DTYPES[dtype]).contiguous() for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        del tensors["output.weight"]  # the same tensor as tok_embeddings.weight
    out = out or run_dir / "export" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "step": str(manifest["step"])})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype, manifest["step"]), indent=1) + "\n")
    return out


def load_exported(directory: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """A plain :class:`Transformer` from an exported folder."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = ModelConfig(**json.loads((directory / "config.json").read_text())["fmtrain"]["model"])
    model = _plain_model(cfg)
    tensors = load_file(str(directory / "model.safetensors"))
    if cfg.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    return model.to(dtype)
