"""Any transformers causal LM as an fmtrain model: ``model=hf_auto model.path=DIR``.

    spec = models.get("hf_auto")
    with torch.device("meta"):
        model = spec.build(cfg.model)     # AutoModelForCausalLM.from_config(DIR/config.json), no weights yet
    model(input_ids)                      # logits (batch, seq, vocab), as every fmtrain model

The model is transformers' own class, built on the meta device from the directory's ``config.json``;
its forward is narrowed to fmtrain's contract (ids in, logits out, no cache) by a subclass made
here, so parameter names, ``trainer.freeze`` patterns and the checkpoint's keys are transformers'
own (``model.layers.0.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn.weight``, ...).

- Blocks (what FSDP shards, activation checkpointing recomputes): the modules whose class the model
  names in ``_no_split_modules`` (its decoder layers).
- Tensor parallelism: the config's own plan (``base_model_tp_plan``), its ``colwise``/``rowwise``
  layers split, the layers it would only replicate or gather (embeddings, the head) kept whole; a
  config without a plan, or with styles fmtrain does not apply, is refused before launch.
- Weights: read sharded by :mod:`fmtrain.pretrained` (the adapter is the identity, but for the
  tied copies safetensors stores once); a random init draws from the seed as Hugging Face's
  generic rule does (normal(initializer_range) matrices, zero biases, unit norms).
- Non-persistent buffers (rotary frequencies) are computed by the model's own ``_init_weights``,
  as ``from_pretrained`` does after building on the meta device.
- Code from the directory (``auto_map``) runs only with ``model.trust_remote_code=true``.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmtrain.config import ConfigError, ModelConfig
from fmtrain.models.spec import Assign, ModelSpec, copy_value, draw_weights, meta_device

# Styles of a transformers tp plan: the ones fmtrain splits, and the ones that leave a layer whole
# (an embedding or head that transformers would split and gather again computes the same whole).
SPLIT = {"colwise": "colwise", "rowwise": "rowwise"}
WHOLE = {"colwise_rep", "colwise_gather_output", "rowwise_rep", "embedding_rowwise", "gather", "replicate"}
# ModelConfig's fields that mirror config.json (conf/model/hf_auto.yaml): an override cannot change
# what transformers builds, so one that differs is refused rather than ignored
MIRRORED = {
    "dim": ("hidden_size", "n_embd", "d_model"),
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "n_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
}


def _transformers() -> Any:
    import logging

    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.arch", "hf_auto", "needs the transformers package: pip install 'fmtrain[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    return transformers


@functools.cache
def hf_config(path: str, trust_remote_code: bool) -> Any:
    """transformers' config of a model directory (its defaults filled in), refused with the field named."""
    if not path:
        raise ConfigError("model.path", path, "required with model=hf_auto: a Hugging Face model directory, model.path=DIR")
    transformers = _transformers()
    raw = json.loads((Path(path) / "config.json").read_text())
    if raw.get("auto_map") and not trust_remote_code:
        raise ConfigError(
            "model.trust_remote_code",
            False,
            f"{path} names its own Python code (auto_map in config.json), which runs only with "
            "model.trust_remote_code=true: set it if you trust that directory",
        )
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as error:
        raise ConfigError("model.path", path, f"transformers cannot read its config.json: {error}") from None
    causal = transformers.AutoModelForCausalLM._model_mapping
    if type(config) not in causal and "AutoModelForCausalLM" not in (raw.get("auto_map") or {}):
        raise ConfigError(
            "model.path",
            path,
            f"its model_type {config.model_type!r} has no causal-LM class in transformers {transformers.__version__} "
            "(AutoModelForCausalLM): model=hf_auto trains causal language models",
        )
    return config


_LOGITS_CLASSES: dict[type, type] = {}


def _logits_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with fmtrain's forward: token ids in, logits out (no cache, no loss); one per class."""
    if cls in _LOGITS_CLASSES:
        return _LOGITS_CLASSES[cls]
    original = cls.forward

    def forward(
        self: nn.Module,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Packed rows (data.packing=bfd): transformers' masks find the examples where the positions
        # restart (masking_utils.find_packed_sequence_indices) and keep attention within each.
        extra = {"position_ids": position_ids} if position_ids is not None else {}
        output = original(self, input_ids=input_ids, use_cache=False, **extra)
        return output.logits if hasattr(output, "logits") else output[0]

    narrowed = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    _LOGITS_CLASSES[cls] = narrowed
    return narrowed


def tied_names(model: nn.Module) -> dict[str, str]:
    """Each later name of a parameter shared by two modules -> its first name (a tied head -> the embeddings)."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


class HFAutoAdapter:
    """transformers' names are the model's own, but for what its checkpoint conversions rename (v5's
    ``conversion_mapping``: e.g. GPT-NeoX's ``embed_out`` is the model's ``lm_head``), the tied copies
    ``save_pretrained`` stores once, and buffers some checkpoints carry that the class ignores. The
    renamings are transformers' own objects, applied as ``from_pretrained`` and ``save_pretrained`` do."""

    def __init__(self, cfg: ModelConfig, model: Any) -> None:  # a transformers PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        self.cfg = cfg
        self.model = model
        self.tied = tied_names(model)
        self.meta_state = dict(model.state_dict())
        self.ignored_patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        conversions = get_model_conversion_mapping(self.model)
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if not isinstance(c, WeightRenaming)]  # tensors merged or split

    def to_external(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, {name: v for name, v in state.items() if name not in self.tied})

    def from_external(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import rename_source_key

        prefix = getattr(self.model, "base_model_prefix", None) or None
        return {rename_source_key(name, self.renamings, [], prefix, self.meta_state)[0]: v for name, v in state.items()}

    def ignored(self, name: str) -> bool:
        """A tensor of the files the model does not have and does not need (``_keys_to_ignore_on_load_unexpected``)."""
        return any(pattern.search(name) for pattern in self.ignored_patterns)

    def external_config(self) -> dict[str, object]:
        """The source's config.json as it is: the export is the same architecture, sizes and settings."""
        config = json.loads((Path(self.cfg.path) / "config.json").read_text())
        config.pop("fmtrain", None)
        return config


class HFAutoSpec(ModelSpec):
    name = "hf_auto"

    def config(self, cfg: ModelConfig) -> Any:
        return hf_config(cfg.path, cfg.trust_remote_code)

    def build(self, cfg: ModelConfig) -> nn.Module:
        transformers = _transformers()
        model = transformers.AutoModelForCausalLM.from_config(
            self.config(cfg), dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
        )
        model.__class__ = _logits_class(type(model))
        return model

    def takes_packed(self, cfg: ModelConfig) -> bool:
        """A class whose module builds its masks with transformers' ``create_causal_mask`` (v5's decoders),
        which reads packed examples from restarting position ids; a model's own code: not known."""
        config = self.config(cfg)
        cls = _transformers().AutoModelForCausalLM._model_mapping.get(type(config), None)
        return cls is not None and hasattr(sys.modules.get(cls.__module__), "create_causal_mask")

    def check(self, cfg: ModelConfig) -> None:
        config = self.config(cfg)
        for field, keys in MIRRORED.items():
            theirs = next((getattr(config, key) for key in keys if getattr(config, key, None) is not None), None)
            if theirs is not None and getattr(cfg, field) != theirs:
                raise ConfigError(
                    f"model.{field}",
                    getattr(cfg, field),
                    f"must be {theirs}, {cfg.path}/config.json's {keys[0]}: model=hf_auto builds what config.json says",
                )
        adapter = self.adapter(cfg)
        if not adapter.model._no_split_modules:
            raise ConfigError(
                "model.path", cfg.path, f"{type(adapter.model).__name__} names no decoder layers (_no_split_modules)"
            )
        if adapter.converters:
            raise ConfigError(
                "model.path",
                cfg.path,
                f"transformers converts {type(adapter.model).__name__}'s checkpoint tensors when it loads them "
                f"({type(adapter.converters[0]).__name__}): model=hf_auto reads only checkpoints it can rename",
            )

    def adapter(self, cfg: ModelConfig) -> HFAutoAdapter:
        with meta_device():
            return HFAutoAdapter(cfg, self.build(cfg))

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        names = set(model._no_split_modules or ())  # type: ignore[arg-type]
        return [module for module in model.modules() if type(module).__name__ in names]

    def init_weights(
        self,
        model: nn.Module,
        seed: int,
        assign: Assign = copy_value,
        parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    ) -> None:
        std = float(getattr(model.config, "initializer_range", None) or 0.02)
        owners = {name: type(module).__name__ for name, module in model.named_modules()}

        def value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
            owner, _, leaf = name.rpartition(".")
            if leaf == "bias":
                return torch.zeros(shape)
            if "Norm" in owners.get(owner, "") or "norm" in owner.rpartition(".")[2]:
                return torch.ones(shape)
            return torch.empty(shape).normal_(0.0, std, generator=generator)

        draw_weights(parameters or model.named_parameters(), seed, assign, value)
        self.init_buffers(model)

    @torch.no_grad()
    def init_buffers(self, model: nn.Module) -> None:
        """Non-persistent buffers (rotary frequencies) from the model's own ``_init_weights``, once
        ``to_empty`` has given them memory, and the tied weights tied again (what ``from_pretrained``
        does after its meta build)."""
        for module in model.modules():
            if any(True for _ in module.buffers(recurse=False)):
                model._init_weights(module)  # type: ignore[operator]
        model.tie_weights()  # type: ignore[operator]  # to_empty of a sharded (DTensor) parameter unties it

    def tp_plan(self, model: nn.Module) -> dict[str, str] | None:
        plan = _hf_tp_plan(model)
        if plan is None:
            return None
        modules = [name for name, _ in model.named_modules()]
        return {
            name: SPLIT[style] for pattern, style in plan.items() if style in SPLIT for name in fnmatch.filter(modules, pattern)
        }

    def tp_divides(self, cfg: ModelConfig) -> list[tuple[str, int]]:
        config = self.config(cfg)
        heads = getattr(config, "num_attention_heads", None) or cfg.n_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        return [("num_attention_heads", heads), ("num_key_value_heads", kv)]

    def check_tensor_parallel(self, cfg: ModelConfig, strategy: str, tp: int, sequence_parallel: bool) -> None:
        with meta_device():
            model = self.build(cfg)
        plan = _hf_tp_plan(model)
        config = type(model.config).__name__
        if not plan:
            raise ConfigError(
                "strategy.name", strategy, f"{config} has no tensor-parallel plan (base_model_tp_plan): use ddp or fsdp"
            )
        if other := sorted({style for style in plan.values() if style not in SPLIT and style not in WHOLE}):
            raise ConfigError(
                "strategy.name",
                strategy,
                f"{config}'s tensor-parallel plan uses {', '.join(other)}, which fmtrain does not apply "
                "(it splits colwise and rowwise layers): use ddp or fsdp",
            )
        super().check_tensor_parallel(cfg, strategy, tp, sequence_parallel)

    def flops_per_token(self, model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
        """6 x the matrices of the blocks and the head, + attention's 12 x layers x dim x seq (PaLM, app. B)."""
        blocks = sum(p.numel() for block in self.blocks(model) for p in block.parameters() if p.dim() == 2)
        head = model.get_output_embeddings()  # type: ignore[operator]
        return 6.0 * (blocks + (head.weight.numel() if head is not None else 0)) + 12.0 * cfg.n_layers * cfg.dim * seq_len

    def export_config(self, cfg: ModelConfig) -> dict[str, object]:
        return self.adapter(cfg).external_config()


def _hf_tp_plan(model: nn.Module) -> dict[str, str] | None:
    """The model's transformers tp plan, as full module-name patterns (base model's under its prefix)."""
    base = getattr(model.config, "base_model_tp_plan", None)
    if not base:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    plan = {f"{prefix}.{pattern}" if prefix else pattern: style for pattern, style in base.items()}
    return plan | dict(getattr(model, "_tp_plan", None) or {})
