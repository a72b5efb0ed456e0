"""Where a run's first weights come from: a random init, a Hugging Face model directory, or an
fmtrain checkpoint of any strategy and world size (weights only: fresh optimizer, step 0).

    source = initial_weights(cfg)            # trainer.init_from, else model.path, else None (random)
    check(cfg)                               # before launch: the files, the architecture, every tensor
    load(wrapped, recipe, source)            # on every rank, once the strategy has built the model

A Hugging Face directory is read one tensor at a time (safetensors, memory-mapped), mapped by the
model's state-dict adapter (names, the q/k rotary layout) and copied into each rank's part of the
parameter: under fsdp, tp and fsdp_tp no rank holds more than its shards plus one whole tensor.
An fmtrain checkpoint is resharded by ``torch.distributed.checkpoint``. The run's own checkpoints
still come first (``trainer.resume``): a fine-tune that is interrupted resumes from its own
checkpoint, never from the base again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from fmtrain.config import ConfigError, TrainConfig
from fmtrain.manifests import MANIFEST, CheckpointError, verify
from fmtrain.models import recipe as model_recipe
from fmtrain.models.spec import Recipe, meta_device

log = logging.getLogger("fmtrain")

# config.json's architecture -> the fmtrain spec whose adapter maps it
SUPPORTED = {name: "llama" for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}
INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
SKIPPED = ("rotary_emb.inv_freq",)  # buffers some checkpoints store; computed from the config


def initial_weights(cfg: TrainConfig) -> tuple[str, Path] | None:
    """The field that names the run's first weights and its path; None: a random init from the seed."""
    if cfg.trainer.init_from:
        return "trainer.init_from", Path(cfg.trainer.init_from)
    if cfg.model.path:
        return "model.path", Path(cfg.model.path)
    return None


def sets_every_weight(source: tuple[str, Path] | None) -> bool:
    """Whether loading ``source`` writes every parameter (a Hugging Face directory: a missing tensor
    is an error), so that a seeded init before it would be wasted. An fmtrain checkpoint may lack
    some (its model is loaded partially, e.g. before new layers): the seeded init stays under it."""
    return source is not None and not (source[1] / MANIFEST).is_file()


def check(cfg: TrainConfig) -> None:
    """Refuse, before launch, initial weights that cannot load: named with the field and the path."""
    source = initial_weights(cfg)
    if source is None:
        return
    field, path = source
    if not path.exists():
        raise ConfigError(field, str(path), "no such file or directory")
    if (path / MANIFEST).is_file():
        if cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 3 and cfg.strategy.zero_init:
            raise ConfigError(
                field,
                str(path),
                "an fmtrain checkpoint cannot load into ZeRO-3's partitioned init (strategy.zero_init=true): "
                "set it false, or strategy=fsdp (a Hugging Face directory can)",
            )
        try:
            verify(path)
        except CheckpointError as error:
            raise ConfigError(field, str(path), str(error)) from None
        return
    if not (path / "config.json").is_file():
        raise ConfigError(
            field, str(path), "neither a Hugging Face model directory (config.json) nor an fmtrain checkpoint (manifest.json)"
        )
    if cfg.model.arch == "llama":
        check_hf_config(field, path, cfg)
    recipe = model_recipe(cfg)
    adapter = recipe.spec.adapter(recipe.cfg)
    if adapter is None:
        raise ConfigError(field, str(path), f"model.arch={cfg.model.arch} has no Hugging Face adapter (ModelSpec.adapter)")
    with meta_device():
        expected = {name: list(t.shape) for name, t in adapter.to_external(recipe.build().state_dict()).items()}
    found = header_shapes(field, path, cfg.model.allow_pickle)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not _skipped(n, adapter, cfg.model.tie_embeddings))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing or unexpected:
        what = [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        ]
        raise ConfigError(
            field, str(path), f"its tensors do not match model.arch={cfg.model.arch}: {'; '.join(w for w in what if w)}"
        )
    if wrong:
        name = wrong[0]
        raise ConfigError(field, str(path), f"tensor {name} has shape {found[name]}, the model needs {expected[name]}")


def check_hf_config(field: str, path: Path, cfg: TrainConfig) -> None:
    """What of a Llama-family config.json fmtrain's decoder cannot compute the same way."""
    hf = json.loads((path / "config.json").read_text())
    architecture = (hf.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED:
        raise ConfigError(
            field,
            str(path),
            f"architecture {architecture} is not supported by model=hf (fmtrain's own decoder); supported: "
            f"{', '.join(SUPPORTED)}; any other transformers causal LM: model=hf_auto",
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    unsupported = {
        f"rope scaling {rope_type}": rope_type not in ("default", "llama3"),
        "biases on every attention projection": bool(hf.get("attention_bias")) and architecture != "Qwen2ForCausalLM",
        "MLP biases": bool(hf.get("mlp_bias")),
        f"activation {hf.get('hidden_act')}": hf.get("hidden_act", "silu") != "silu",
        f"a sliding window of {window} tokens shorter than data.seq_len={cfg.data.seq_len}": (window or cfg.data.seq_len)
        < cfg.data.seq_len,
    }
    if problems := [what for what, present in unsupported.items() if present]:
        raise ConfigError(field, str(path), f"{architecture} with {', '.join(problems)} is not supported yet")
    if cfg.model.qk_norm != (architecture == "Qwen3ForCausalLM") or cfg.model.qkv_bias != (architecture == "Qwen2ForCausalLM"):
        raise ConfigError(
            field,
            str(path),
            f"{architecture} needs model.qkv_bias={architecture == 'Qwen2ForCausalLM'} and "
            f"model.qk_norm={architecture == 'Qwen3ForCausalLM'} (model=hf sets them)",
        )


def _skipped(name: str, adapter: Any, tied: bool) -> bool:
    """A tensor of the files that loading leaves out: buffers computed from the config, a tied head
    (its weights are the embeddings'), what the adapter says the model ignores."""
    ignored = getattr(adapter, "ignored", None)
    return name.endswith(SKIPPED) or (tied and name == "lm_head.weight") or (ignored is not None and ignored(name))


def weight_files(field: str, path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model directory: safetensors (one, or the shards its index names), or,
    with ``model.allow_pickle``, ``pytorch_model.bin`` (one, or the shards of its index)."""
    if (path / INDEX).is_file():
        return [path / name for name in sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if allow_pickle and (path / PICKLE_INDEX).is_file():
        return [path / name for name in sorted(set(json.loads((path / PICKLE_INDEX).read_text())["weight_map"].values()))]
    if allow_pickle and (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ConfigError(
            field,
            str(path),
            "has only pickle weights (.bin): convert them to safetensors, or set model.allow_pickle=true "
            "(read with torch.load(weights_only=True))",
        )
    raise ConfigError(field, str(path), "has no weights: model.safetensors or model.safetensors.index.json")


def open_weights(file: Path) -> SafetensorsFile | PickleFile:
    return PickleFile(file) if file.suffix == ".bin" else SafetensorsFile(file)


def header_shapes(field: str, path: Path, allow_pickle: bool = False) -> dict[str, list[int]]:
    """Every tensor's shape, from the safetensors headers (no tensor is read; pickle files are mapped)."""
    shapes: dict[str, list[int]] = {}
    for file in weight_files(field, path, allow_pickle):
        if not file.is_file():
            raise ConfigError(field, str(path), f"{file.name}, named by its index, is missing")
        try:
            with open_weights(file) as f:
                shapes |= {name: shape for name, (_, shape) in f.tensors.items()}
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            kind = "pickle" if file.suffix == ".bin" else "safetensors"
            raise ConfigError(field, str(path), f"{file.name} is not a readable {kind} file ({error!r})") from None
    return shapes


def load(wrapped: nn.Module, recipe: Recipe, source: tuple[str, Path]) -> None:
    """Copy the source's weights into the built (and sharded) model ``wrapped``, on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    field, path = source
    before = _reset_peak_rss()
    if any(hasattr(p, "ds_id") for p in wrapped.parameters()):  # ZeRO-3's partitioned init (zero.Init)
        _load_hf_partitioned(wrapped, recipe, field, path)
        _log_loaded(field, path, recipe, before)
        return
    state = get_model_state_dict(wrapped)
    if (path / MANIFEST).is_file():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        holder = {"model": state}
        dcp.load(
            holder,
            checkpoint_id=path / "model_optim",
            planner=DefaultLoadPlanner(allow_partial_load=True),
            no_dist=not dist.is_initialized(),
        )
    else:
        _load_hf(state, recipe, field, path)
    set_model_state_dict(wrapped, state)
    _log_loaded(field, path, recipe, before)


def _log_loaded(field: str, path: Path, recipe: Recipe, before: int | None) -> None:
    whole = sum(p.numel() * p.element_size() for p in recipe.meta().parameters()) / 2**20
    if before is not None and (peak := _peak_rss()) is not None:
        log.info(
            "initialized the model's weights from %s (%s): loading added at most %.0f MB to this process's "
            "resident memory, its own part of the model included (the whole model: %.0f MB; this process's "
            "peak resident memory while loading: %.0f MB)",
            path,
            field,
            (peak - before) / 2**20,
            whole,
            peak / 2**20,
        )
    else:
        log.info("initialized the model's weights from %s (%s)", path, field)


def _load_hf(state: dict[str, Any], recipe: Recipe, field: str, path: Path) -> None:
    """Each tensor of the files into this rank's part of its parameter. A tensor the adapter only
    renames, for a parameter split by rows (fsdp's Shard(0)), is read for this rank's rows alone; the
    others (q/k, permuted; tp's column splits) are read whole, one at a time, and distributed."""
    adapter = recipe.spec.adapter(recipe.cfg)
    assert adapter is not None  # check() refused it before launch
    loaded: set[str] = set()
    for f, name, placeholder in _file_tensors(recipe, field, path):
        mapped = adapter.from_external({name: placeholder})
        if not mapped.keys() <= state.keys() and _skipped(name, adapter, recipe.cfg.tie_embeddings):
            continue  # one the model ignores (check() refused any other the model has no place for)
        for ours, value in mapped.items():
            rows = _local_rows(state[ours]) if value is placeholder else None
            if rows is not None:
                state[ours].to_local().copy_(f.read(name, rows))
            else:
                _copy_into(state[ours], adapter.from_external({name: f.read(name)})[ours])
            loaded.add(ours)
    tied = _check_every_weight(set(state), loaded, adapter, path)
    for name, first in tied.items():  # the state dict may hold a copy for each name: the loaded one wins
        if name in state and name not in loaded:
            state[name] = state[first]


def _file_tensors(recipe: Recipe, field: str, path: Path) -> Iterator[tuple[SafetensorsFile | PickleFile, str, torch.Tensor]]:
    """Each tensor of a model directory's files that loading reads, as (its open file, its name, a meta
    placeholder of its shape and dtype): not the buffers computed from the config, nor a tied head."""
    for file in weight_files(field, path, recipe.cfg.allow_pickle):
        with open_weights(file) as f:
            for name, (dtype, shape) in f.tensors.items():
                if name.endswith(SKIPPED) or (name == "lm_head.weight" and recipe.cfg.tie_embeddings):
                    continue
                yield f, name, torch.empty(shape, dtype=dtype, device="meta")


def _check_every_weight(names: set[str], loaded: set[str], adapter: Any, path: Path) -> dict[str, str]:
    """Refuse a load that left a parameter out (a tied name counts as loaded with its first name);
    the adapter's ties (later name -> first name) for the caller."""
    tied: dict[str, str] = getattr(adapter, "tied", {})
    if missing := sorted(name for name in names - loaded if tied.get(name) not in loaded):
        raise CheckpointError(f"{path}: no weights for {', '.join(missing[:5])}")
    return tied


def _load_hf_partitioned(model: nn.Module, recipe: Recipe, field: str, path: Path) -> None:
    """A Hugging Face directory into a model built under DeepSpeed's ``zero.Init``: each parameter is
    gathered alone, rank 0 copies the file's tensor into it, and DeepSpeed partitions it again from
    rank 0's value. No rank holds more than its partitions plus one whole parameter."""
    import deepspeed

    adapter = recipe.spec.adapter(recipe.cfg)
    assert adapter is not None  # check() refused it before launch
    params = dict(model.named_parameters())
    writer = not dist.is_initialized() or dist.get_rank() == 0
    loaded: set[str] = set()
    for f, name, placeholder in _file_tensors(recipe, field, path):
        if not adapter.from_external({name: placeholder}).keys() & params.keys():
            continue  # one the model ignores (check() refused any other)
        for ours, value in adapter.from_external({name: f.read(name) if writer else placeholder}).items():
            if ours not in params:
                continue  # a tied name: the parameter is its first name's
            with deepspeed.zero.GatheredParameters([params[ours]], modifier_rank=0):
                if writer:
                    params[ours].data.copy_(value.to(params[ours].dtype))
            loaded.add(ours)
    _check_every_weight(set(params), loaded, adapter, path)


def _local_rows(target: torch.Tensor) -> tuple[int, int] | None:
    """The rows [start, stop) of the whole tensor that this rank's shard of ``target`` holds, when the
    shard is exactly a block of rows (a DTensor split on dim 0 only); else None."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(target, DTensor) or not all(p == Shard(0) or isinstance(p, Replicate) for p in target.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(target.shape[1:]):
        return None
    return offset[0], offset[0] + shape[0]


class SafetensorsFile:
    """A safetensors file read with plain reads, not a memory map: a tensor's bytes, or a block of its
    rows, land in memory of their own, and nothing else of the file stays resident.

    Format: 8 bytes (little-endian header length), a JSON header {name: {dtype, shape, data_offsets}},
    then the data (https://github.com/huggingface/safetensors#format)."""

    DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115  (closed by __exit__)
        length = int.from_bytes(self._file.read(8), "little")
        header = json.loads(self._file.read(length))
        self._data = 8 + length
        header.pop("__metadata__", None)
        self._entries = header
        self.tensors = {name: (self.DTYPES[e["dtype"]], list(e["shape"])) for name, e in header.items()}
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if (size := os.fstat(self._file.fileno()).st_size) < self._data + end:
            self._file.close()
            raise ValueError(f"truncated: {size} bytes, its header describes {self._data + end}")

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        dtype, shape = self.tensors[name]
        start, stop = self._entries[name]["data_offsets"]
        if rows is not None and shape:
            row_bytes = (stop - start) // max(shape[0], 1)
            start, stop, shape = start + rows[0] * row_bytes, start + rows[1] * row_bytes, [rows[1] - rows[0], *shape[1:]]
        buffer = bytearray(stop - start)
        self._file.seek(self._data + start)
        self._file.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class PickleFile:
    """``pytorch_model.bin`` read as :class:`SafetensorsFile` is (``model.allow_pickle``): loaded with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, no code) and memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(self._state, dict):
            raise ValueError(f"holds a {type(self._state).__name__}, not a state dict")
        self._state = {name: t for name, t in self._state.items() if isinstance(t, torch.Tensor)}
        self.tensors = {name: (t.dtype, list(t.shape)) for name, t in self._state.items()}

    def __enter__(self) -> PickleFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._state = {}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self._state[name]
        return (tensor[rows[0] : rows[1]] if rows is not None else tensor).clone()


def _reset_peak_rss() -> int | None:
    """This process's resident bytes now, its high-water mark reset to it (Linux); None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
        return _status_kb("VmRSS") * 1024
    except (OSError, ValueError):
        return None


def _peak_rss() -> int | None:
    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, ValueError):
        return None


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise ValueError(key)


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """A whole tensor into a parameter: a DTensor keeps only its own shard (every rank read the same value)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if target.shape != value.shape:
        raise CheckpointError(f"tensor of shape {list(value.shape)} for a parameter of shape {list(target.shape)}")
    value = value.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        local = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(value)
