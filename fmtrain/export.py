"""Export a run's checkpoint for other tools: a Hugging Face model directory, proven by loading it back.

    fmtrain export RUN_DIR [--step N] [--dtype fp32|bf16] [--format hf|fmtrain] [--max-shard-size 5GB] [--out DIR]

``--format hf`` (the default) writes what ``transformers.AutoModelForCausalLM.from_pretrained`` loads
as the model's own class with no missing or unexpected keys: tensors named and laid out by the
model's state-dict adapter (``ModelSpec.adapter``), ``model.safetensors`` (or shards of at most
``--max-shard-size`` with ``model.safetensors.index.json``), ``config.json`` (the adapter's, plus the
dtype and fmtrain's own model config), ``generation_config.json`` and the run's tokenizer (the
model directory's ``tokenizer.json`` or SentencePiece ``tokenizer.model`` and settings, or fmtrain's
byte tokenizer as a ``tokenizer.json``: id = byte value). ``--format fmtrain`` keeps the model's own
tensor names (a model without an adapter). The files are written one tensor at a time, each read
alone from the DCP checkpoint whatever strategy and world size wrote it (:func:`write_streamed`): the
whole model is never gathered in memory to write them. Both formats load in one process without
torch.distributed:

    model = load_exported("outputs/default/run/export/step_000120")

Every export writes ``verification.json``: the largest logit difference, on a fixed batch, between
the export as its consumer loads it (transformers when installed, else :func:`load_exported`) and
the checkpoint it came from. An export that loads with missing or unexpected tensors, or whose fp32
logits differ by more than 1e-4, is an error, not a file left behind.

``--out`` (default ``RUN_DIR/export/step_<N>``) must be a new or empty folder, or an earlier export,
known by its ``fmtrain-export.json`` (the files it wrote). The export is written and verified in a
folder of its own inside ``--out`` first; then the earlier export's files, and only those, are
replaced. The run directory, a folder holding it, its checkpoints and a folder with other files are
refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmtrain import models
from fmtrain.checkpoint import single_process_dcp
from fmtrain.config import ConfigError, ModelConfig, TrainConfig, load
from fmtrain.manifests import CheckpointError, newest_valid, step_dir_name, verify, writable_problem
from fmtrain.models.spec import meta_device
from fmtrain.pretrained import SafetensorsFile
from fmtrain.strategies import DTYPES
from fmtrain.tokenizer import json_or_empty, tokenizer_of

FORMATS = ("hf", "fmtrain")
INDEX = "model.safetensors.index.json"
FP32_TOLERANCE = 1e-4  # logits of an fp32 export as loaded vs the checkpoint's (measured: ~1e-6)
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class ExportError(CheckpointError):
    """The export could not be written, or does not load back as it must."""


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1000`` (bytes) -> bytes; ``--max-shard-size``'s values."""
    match = SIZE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size: a positive number with an optional unit B, KB, MB, GB, KiB, MiB, GiB")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "b").lower()])


def _plain_model(cfg: ModelConfig) -> nn.Module:
    spec = models.get(cfg.arch)
    with meta_device():
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


def _checkpoint(run_dir: Path, step: int | None) -> Path:
    if step is None:
        checkpoint = newest_valid(run_dir / "checkpoints")
        if checkpoint is None:
            raise CheckpointError(f"{run_dir}/checkpoints: no valid checkpoint to export")
        return checkpoint
    checkpoint = run_dir / "checkpoints" / step_dir_name(step)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint")
    return checkpoint


def export(
    run_dir: Path,
    step: int | None = None,
    dtype: str = "fp32",
    out: Path | None = None,
    format: str = "hf",
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write one checkpoint of ``run_dir`` in ``format`` and verify it loads back; return the folder."""
    checkpoint = _checkpoint(run_dir, step)
    manifest = verify(checkpoint)
    run_cfg = load(run_dir / "config.yaml")
    models.import_modules(run_cfg.imports)
    cfg = run_cfg.model
    if format == "hf" and models.get(cfg.arch).adapter(cfg) is None:
        raise ExportError(
            f"--format hf: model.arch={cfg.arch} has no Hugging Face adapter (ModelSpec.adapter); use --format fmtrain"
        )
    out = out or run_dir / "export" / checkpoint.name
    replaced = check_out(out, run_dir)
    staging = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=out))  # beside its destination: moved in by rename
    try:
        _write(staging, checkpoint, manifest["step"], run_cfg, format, dtype, max_shard_bytes)
        publish(staging, out, replaced)
    except OSError as error:
        raise ExportError(f"--out {out}: cannot write the export: {error.strerror or error}") from None
    except ExportError as error:
        raise ExportError(f"{out}: {error}; nothing was written there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # fmtrain's own folder: empty once published
    return out


def _write(out: Path, checkpoint: Path, step: int, run_cfg: TrainConfig, format: str, dtype: str, max_shard_bytes: int) -> None:
    """The export's files in ``out``, verified (:func:`verify_export`) before anything is published."""
    cfg = run_cfg.model
    spec = models.get(cfg.arch)
    adapter = spec.adapter(cfg)
    torch_dtype = str(DTYPES[dtype]).removeprefix("torch.")
    aliases: dict[str, str] = {}
    fmtrain_section = {"model": asdict(cfg), "step": step, "format": format, "tokenizer": run_cfg.data.tokenizer}
    if format == "hf":
        assert adapter is not None
        config: dict[str, Any] = adapter.external_config() | {"torch_dtype": torch_dtype, "dtype": torch_dtype}
        config |= _write_tokenizer(out, run_cfg)
        if cfg.trust_remote_code:  # the model's own code (config.json's auto_map) goes with it
            for code in Path(cfg.path).glob("*.py"):
                shutil.copyfile(code, out / code.name)
    else:
        with meta_device():
            aliases = _aliases(spec.build(cfg))
        config = spec.export_config(cfg) | {"torch_dtype": torch_dtype}
        fmtrain_section["aliases"] = aliases
    config["fmtrain"] = fmtrain_section
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    convert = adapter.to_external if format == "hf" and adapter is not None else _Unaliased(aliases)
    write_streamed(checkpoint, cfg, convert, out, DTYPES[dtype], max_shard_bytes, step)
    verification = verify_export(out, checkpoint, cfg, dtype)
    (out / "verification.json").write_text(json.dumps(verification, indent=1) + "\n")


# ----------------------------------------------------------------------------- the output folder
#
# fmtrain never deletes or overwrites a file it did not write. An export folder is new, empty, or an earlier
# export, known by its record (RECORD: the files that export wrote); a new export replaces those files only,
# and only once it is written and verified (it is written first into a folder of fmtrain's own inside --out).

RECORD = "fmtrain-export.json"
PARTIAL = ".fmtrain-export-partial-"  # a folder an export is written in; one left by a killed export is fmtrain's


def check_out(out: Path, run_dir: Path) -> list[str]:
    """Refuse (:class:`ExportError`) an output folder that is, holds or lies in the run's own files, holds
    files fmtrain did not write, or cannot be written; make it, and return the files of the earlier
    export there (those a new export replaces)."""
    where, run = out.resolve(), run_dir.resolve()
    if where == run or run.is_relative_to(where):
        raise ExportError(f"--out {out} is the run directory or holds it: export into a folder of its own")
    if where.is_relative_to(run / "checkpoints"):
        raise ExportError(f"--out {out} is inside the run's checkpoints: export into a folder of its own")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if (problem := writable_problem(out)) is not None:
        raise ExportError(f"--out {out}: {problem}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"--out {out}: cannot make it: {error.strerror or error}") from None
    theirs = sorted(entry.name for entry in out.iterdir() if not entry.name.startswith(PARTIAL))
    if not theirs:
        return []
    if RECORD not in theirs:
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise ExportError(
            f"--out {out} holds files fmtrain did not write ({shown}) and no {RECORD} of an earlier export: "
            "export into a new or empty folder"
        )
    try:
        files = json.loads((out / RECORD).read_text())["files"]
        if not (isinstance(files, list) and all(isinstance(f, str) and f == Path(f).name for f in files)):
            raise ValueError("its files are not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{out / RECORD} is not an export record ({error}): export into a new or empty folder") from None
    return files


def publish(staging: Path, out: Path, replaced: list[str]) -> None:
    """Move the verified export from ``staging`` into ``out``: the earlier export's files (``replaced``)
    removed first, so that none of its shards is left beside the new ones; any other file is kept."""
    files = sorted(entry.name for entry in staging.iterdir())
    for name in [*replaced, RECORD]:
        (out / name).unlink(missing_ok=True)
    for name in files:
        (staging / name).replace(out / name)
    (out / RECORD).write_text(json.dumps({"files": files}, indent=1) + "\n")
    for leftover in out.glob(f"{PARTIAL}*"):  # of an export killed before it finished: fmtrain's own
        if leftover != staging:
            shutil.rmtree(leftover, ignore_errors=True)


class _Unaliased:
    """fmtrain's own names, each tied tensor once (its later names are recorded as aliases)."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t for name, t in state.items() if name not in self.aliases}


SAFETENSORS_DTYPES = {dtype: code for code, dtype in SafetensorsFile.DTYPES.items()}


def write_streamed(
    checkpoint: Path,
    cfg: ModelConfig,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    out: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
    step: int,
) -> None:
    """The checkpoint's model as safetensors files, one tensor at a time: each is read alone from the
    DCP checkpoint (whatever strategy and world size wrote it: DCP assembles its shards), converted
    (``convert``: an adapter's ``to_external``, per tensor), and written at its place in its file,
    whose header is computed first from the model's shapes. The whole model is never in memory.

    The files are ``model.safetensors``, or ``model-0000K-of-0000N.safetensors`` + the index when over
    ``max_shard_bytes`` (transformers' names and index format; a tensor larger than the limit gets a
    file of its own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    with meta_device():
        names = models.get(cfg.arch).build(cfg).state_dict()
    stored = dcp.FileSystemReader(str(checkpoint / "model_optim")).read_metadata().state_dict_metadata
    plan: list[tuple[str, str, list[int]]] = []  # (our name, its name in the files, shape)
    for ours, meta in names.items():
        for theirs, value in convert({ours: meta}).items():
            plan.append((ours, theirs, list(value.shape)))
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[2]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map: dict[str, str] = {}
    for file, shard in zip(files, shards, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "step": str(step)}}
        offset = 0
        for _, theirs, shape in shard:
            end = offset + math.prod(shape) * dtype.itemsize
            header[theirs] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, end]}
            offset = end
            weight_map[theirs] = file
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(out / file, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for ours, theirs, shape in shard:
                held = stored[f"model.{ours}"]
                value = torch.empty(list(held.size), dtype=held.properties.dtype)  # type: ignore[union-attr]
                with single_process_dcp():
                    dcp.load(
                        {"model": {ours: value}},
                        checkpoint_id=checkpoint / "model_optim",
                        planner=DefaultLoadPlanner(allow_partial_load=True),
                    )
                tensor = convert({ours: value})[theirs].to(dtype).contiguous()
                assert list(tensor.shape) == shape, (theirs, tensor.shape, shape)
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # its own memory, no copy
                del value, tensor  # before the next one is read: one tensor in memory at a time
    if len(shards) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for _, _, shape in plan)
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory: one file, or the shards its index names."""
    from safetensors.torch import load_file

    index = directory / INDEX
    if not index.is_file():
        return load_file(str(directory / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors |= load_file(str(directory / shard))
    return tensors


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which ``tokenizers``' ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _write_tokenizer(out: Path, run_cfg: TrainConfig) -> dict[str, Any]:
    """The run's tokenizer beside the model, and generation_config.json; the special ids for config.json."""
    try:
        tokenizer = tokenizer_of(run_cfg)
    except ConfigError as error:
        raise ExportError(f"the run's tokenizer cannot be read: {error}") from None
    if tokenizer.file is None:
        _write_byte_tokenizer(out)
        _write_chat_template(out, run_cfg, None)
        ids: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None}  # the byte tokenizer has neither
    else:
        shutil.copyfile(tokenizer.file, out / ("tokenizer.model" if tokenizer.sentencepiece else "tokenizer.json"))
        for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tokenizer.file.parent / name).is_file():
                shutil.copyfile(tokenizer.file.parent / name, out / name)
        _write_chat_template(out, run_cfg, tokenizer.file.parent)
        source = json_or_empty(Path(run_cfg.model.path) / "config.json") if run_cfg.model.path else {}
        ids = {"bos_token_id": source.get("bos_token_id"), "eos_token_id": tokenizer.eos}
    generation = Path(run_cfg.model.path) / "generation_config.json" if run_cfg.model.path else None
    if generation is not None and generation.is_file():
        shutil.copyfile(generation, out / "generation_config.json")
    else:
        (out / "generation_config.json").write_text(json.dumps(ids, indent=1) + "\n")
    return ids


def _write_chat_template(out: Path, run_cfg: TrainConfig, folder: Path | None) -> None:
    """A run fine-tuned on examples rendered chats with ``data.chat_template``: chatml, a file, or (auto)
    the tokenizer folder's own, else chatml. Where that is not the folder's own template, it goes beside
    the model as ``chat_template.jinja`` (which transformers reads before tokenizer_config.json's), so
    ``apply_chat_template`` renders what the model was trained on."""
    if run_cfg.data.packing == "concat":
        return
    from fmtrain.examples import chat_template_text

    used = chat_template_text(run_cfg.data, folder)
    settings = json_or_empty(folder / "tokenizer_config.json") if folder is not None else {}
    own = folder is not None and ((folder / "chat_template.jinja").is_file() or isinstance(settings.get("chat_template"), str))
    if not own or used != chat_template_text(dataclasses.replace(run_cfg.data, chat_template="auto"), folder):
        (out / "chat_template.jinja").write_text(used)


def _write_byte_tokenizer(out: Path) -> None:
    """fmtrain's byte tokenizer (id = the byte's value) as ``tokenizer.json``: a byte-level BPE
    without merges, so ``AutoTokenizer`` encodes text to the ids the model was trained on."""
    try:
        from tokenizers import Tokenizer, decoders, pre_tokenizers
        from tokenizers import models as tokenizer_models
    except ImportError:  # pip install 'fmtrain[hf]'; the model itself is still exported
        return
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 10**30, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1) + "\n")


def verify_export(out: Path, checkpoint: Path, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """Load the export as its consumer does and compare logits with the checkpoint's, on a fixed batch
    (the checkpoint's model is let go before the export is loaded: one model in memory at a time)."""
    seq = min(64, cfg.max_seq_len)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_checkpoint_model(checkpoint, cfg).eval()(ids).float()
    config = json.loads((out / "config.json").read_text())
    missing: list[str] = []
    unexpected: list[str] = []
    transformers = _quiet_transformers()
    with torch.no_grad():
        if config["fmtrain"]["format"] == "hf" and transformers is not None:
            loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32, output_loading_info=True, trust_remote_code=cfg.trust_remote_code
            )
            missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
            got = loaded.eval()(input_ids=ids).logits.float()
            loader = f"transformers {transformers.__version__} {type(loaded).__name__}"
        else:
            got = load_exported(out).eval()(ids).float()
            loader = f"fmtrain {metadata.version('fmtrain')} load_exported"
    difference = (got - expected).abs().max().item()
    result = {
        "loader": loader,
        "batch": list(ids.shape),
        "max_abs_logit_diff": difference,
        "max_abs_logit": expected.abs().max().item(),
        "export_dtype": dtype,
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }
    tolerance = FP32_TOLERANCE if dtype == "fp32" else None  # a bf16 export's logits are compared, not bounded
    problems = []
    if missing or unexpected:
        problems.append(f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    if not difference < (tolerance or float("inf")):  # nan fails too
        problems.append(f"logits differ from the checkpoint's by {difference:.3g} (tolerance {tolerance:g})")
    result |= {"tolerance": tolerance, "passed": not problems}
    if problems:
        raise ExportError(f"the export does not load back as the checkpoint ({loader}): {'; '.join(problems)}")
    return result


def _quiet_transformers() -> Any:
    """transformers, if installed, without its progress bars and its optional backends' import noise."""
    import logging

    for noisy in ("torchao", "torch.utils._pytree"):  # e.g. torchao's CUDA kernels on a CPU machine
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_exported(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The plain fmtrain model of an exported folder, either format (a model of your own: import its module first)."""
    directory = Path(directory)
    section = json.loads((directory / "config.json").read_text())["fmtrain"]
    cfg = ModelConfig(**section["model"])
    model = _plain_model(cfg)
    tensors = read_tensors(directory)
    if section.get("format", "fmtrain") == "hf":
        adapter = models.get(cfg.arch).adapter(cfg)
        assert adapter is not None, f"{directory}: a Hugging Face export of model.arch={cfg.arch}, which has no adapter"
        tensors = adapter.from_external(tensors)
    else:
        tensors |= {alias: tensors[name] for alias, name in _aliases(model).items() if alias not in tensors}
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    return model.to(dtype)
