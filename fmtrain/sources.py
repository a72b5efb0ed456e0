"""Where a run's text comes from: one class per ``data=`` option, each reading its input as a stream.

    source = source_of(cfg.data)                 # data.name: stdlib, text_files, jsonl, parquet, hf_disk, tokens
    source.check()                               # before launch: files, columns, splits (cheap)
    bad = BadRecords(cfg.data.on_bad_record)
    for document in source.documents(bad):       # bytes, one document at a time (text sources)
        ...
    for path, ids in source.token_arrays():      # memmaps of ids (data=tokens)
        ...

Nothing holds a whole input: jsonl is read line by line, parquet by record batch, a ``datasets``
folder by batch of its memory-mapped Arrow table, token files as memmaps. A record that cannot be
used (not JSON, no such field, not text, empty, not UTF-8, null) is a :class:`DataError` naming the
file, the line or row and the field, or with ``data.on_bad_record=skip`` is counted and left out;
a whole input that cannot be read (no such column, no such split, a corrupt file) is always an error.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fmtrain.config import ConfigError, DataConfig, resolve_data_paths

BATCH_ROWS = 1024  # rows read at once from parquet and datasets folders
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")  # data=tokens: what a .bin file holds


class DataError(ConfigError):
    """Input that cannot be trained on: the file, where in it, and what is wrong."""

    def __init__(self, file: object, where: str, problem: str) -> None:
        self.file, self.where, self.problem = str(file), where, problem
        place = f"{self.file}, {where}" if where else self.file
        ValueError.__init__(self, f"{place}: {problem}")
        self.key, self.value, self.expected = "data.paths", self.file, f"{where}: {problem}" if where else problem

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # type: ignore[override]
        return type(self), (self.file, self.where, self.problem)


DataError.__module__ = "fmtrain.sources"


@dataclass
class BadRecords:
    """``data.on_bad_record``: ``error`` raises the first bad record; ``skip`` counts them all and keeps
    the first few for the log."""

    policy: str = "error"
    count: int = 0
    first: list[str] = field(default_factory=list)

    def __call__(self, file: object, where: str, problem: str) -> None:
        if self.policy != "skip":
            raise DataError(file, where, f"{problem} (data.on_bad_record=skip leaves such records out and counts them)")
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"{file}, {where}: {problem}")

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first}


class Source:
    """One kind of input. ``kind`` is ``text`` (documents for the tokenizer) or ``tokens`` (ids)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "text"

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def files(self) -> list[Path]:
        """Every file the input is made of: what the cache key's sizes and times cover."""
        return resolve_data_paths(self.cfg.paths)

    def check(self) -> None:
        """Cheap checks before launch; a problem is a :class:`DataError` or ``ConfigError``."""
        if not self.files():
            raise ConfigError("data.paths", self.cfg.paths, "matches no file")

    def documents(self, bad: BadRecords, utf8: bool = False) -> Iterator[bytes]:
        """Each document's bytes; ``utf8``: only valid UTF-8 (what a tokenizer reads; the other sources'
        are text already, text files are checked)."""
        raise NotImplementedError

    def records(self, bad: BadRecords) -> Iterator[tuple[Path, str, dict[str, Any]]]:
        """Records (a mapping each) with their file and line or row: examples, for data.packing=none."""
        raise ConfigError("data.packing", self.cfg.packing, f"needs records (jsonl, parquet, hf_disk), not data={self.cfg.name}")

    def token_arrays(self) -> Iterator[tuple[Path, np.ndarray]]:
        raise NotImplementedError


class TextFiles(Source):
    """``data=text_files``: each file one document, its bytes as they are. ``data=stdlib`` (no paths):
    the Python standard library's own source files, which every machine with Python has."""

    name = "text_files"

    def files(self) -> list[Path]:
        if self.cfg.paths:
            return resolve_data_paths(self.cfg.paths)
        files = []
        for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
            dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
            files += [Path(root, n) for n in names if n.endswith(".py")]
        return sorted(files)

    def documents(self, bad: BadRecords, utf8: bool = False) -> Iterator[bytes]:
        for path in self.files():
            document = path.read_bytes()
            if utf8 and self.cfg.name == "text_files":  # data=stdlib: a few of Python's own test files are latin-1, read as is
                try:
                    document.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad(path, f"byte {error.start}", "not UTF-8, which a tokenizer reads (data.tokenizer=bytes reads any bytes)")
                    continue
            yield document


def _text(value: object, file: Path, where: str, text_field: str, bad: BadRecords) -> bytes | None:
    """A record's text as UTF-8, or None (counted, or raised) for a value that is not usable text."""
    if value is None:
        bad(file, where, f"field {text_field!r} is null")
    elif not isinstance(value, str):
        bad(file, where, f"field {text_field!r} is {type(value).__name__}, not text")
    elif not value:
        bad(file, where, f"field {text_field!r} is empty")
    else:
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates from a \ud800 escape
            bad(file, where, f"field {text_field!r} is not valid Unicode ({error.reason} at character {error.start})")
    return None


def example_columns(cfg: DataConfig, names: list[str], file: object) -> list[str]:
    """The columns an example is read from: prompt and completion, messages, or the text field."""
    for wanted in (["prompt", "completion"], ["messages"], [cfg.text_field]):
        if all(name in names for name in wanted):
            return wanted
    listed = ", ".join(names[:20])
    expected = f"prompt and completion, messages nor {cfg.text_field!r} columns (data.packing={cfg.packing})"
    raise DataError(file, "", f"has neither {expected}; its columns: {listed}")


class Jsonl(Source):
    """``data=jsonl``: one JSON object per line, its ``data.text_field`` a document. Blank lines are
    allowed; a line is read at a time."""

    name = "jsonl"

    def records(self, bad: BadRecords) -> Iterator[tuple[Path, str, dict[str, Any]]]:
        """Each line's object, with its file and line."""
        for path in self.files():
            with open(path, "rb") as lines:
                for number, raw in enumerate(lines, 1):
                    if not raw.strip():
                        continue
                    where = f"line {number}"
                    try:
                        record = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError as error:
                        bad(path, where, f"not UTF-8 (byte {error.start} of the line)")
                        continue
                    except ValueError as error:
                        bad(path, where, f"not JSON ({error})")
                        continue
                    if not isinstance(record, dict):
                        bad(path, where, f"a JSON {type(record).__name__}, not an object")
                        continue
                    yield path, where, record

    def documents(self, bad: BadRecords, utf8: bool = False) -> Iterator[bytes]:
        key = self.cfg.text_field
        for path, where, record in self.records(bad):
            if key not in record:
                fields = ", ".join(map(repr, list(record)[:10])) or "none"
                bad(path, where, f"no field {key!r} (data.text_field); its fields: {fields}")
            elif (text := _text(record[key], path, where, key, bad)) is not None:
                yield text


class Parquet(Source):
    """``data=parquet``: the string column ``data.text_field`` of each file, read a record batch at a time."""

    name = "parquet"

    def _open(self, path: Path) -> Any:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("data.name", "parquet", "needs the pyarrow package: pip install 'fmtrain[data]'") from None
        try:
            table = pq.ParquetFile(path)
        except Exception as error:  # pyarrow's own: not a parquet file, truncated
            raise DataError(path, "", f"cannot be read as parquet: {error}") from None
        names = table.schema_arrow.names
        if self.cfg.packing != "concat":  # examples: prompt/completion, messages or text
            example_columns(self.cfg, names, path)
            return table
        column = table.schema_arrow.field(self.cfg.text_field) if self.cfg.text_field in names else None
        if column is None:
            raise DataError(
                path, "", f"has no column {self.cfg.text_field!r} (data.text_field); its columns: {', '.join(names[:20])}"
            )
        import pyarrow as pa

        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(path, "", f"column {self.cfg.text_field!r} holds {column.type}, not strings")
        return table

    def records(self, bad: BadRecords) -> Iterator[tuple[Path, str, dict[str, Any]]]:
        for path in self.files():
            table = self._open(path)
            columns = example_columns(self.cfg, table.schema_arrow.names, path)
            row = 0
            for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for record in batch.to_pylist():
                    yield path, f"row {row}", record
                    row += 1

    def check(self) -> None:
        super().check()
        for path in self.files():
            self._open(path)

    def documents(self, bad: BadRecords, utf8: bool = False) -> Iterator[bytes]:
        key = self.cfg.text_field
        for path in self.files():
            row = 0
            for batch in self._open(path).iter_batches(batch_size=BATCH_ROWS, columns=[key]):
                for value in batch.column(0).to_pylist():
                    if (text := _text(value, path, f"row {row}", key, bad)) is not None:
                        yield text
                    row += 1


class HFDisk(Source):
    """``data=hf_disk``: a ``datasets`` dataset on this machine, its column ``data.text_field``:

    - a folder ``save_to_disk`` wrote (a ``Dataset``, or a ``DatasetDict`` whose ``data.split`` is read),
      opened with ``load_from_disk`` (memory-mapped Arrow);
    - else a folder of data files (``train.jsonl``, ``data/train-*.parquet``, ... as the Hub lays them
      out) or one such file, read by ``load_dataset`` as a stream (nothing converted or copied), its
      ``data.split`` as ``datasets`` names a folder's splits. Never the Hub: only local paths.
    """

    name = "hf_disk"
    LOADERS: ClassVar[dict[str, str]] = {
        ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"
    }  # fmt: skip

    def folders(self) -> list[Path]:
        return [Path(os.path.expanduser(p)) for p in self.cfg.paths]

    def _open(self, folder: Path) -> Any:
        try:
            import datasets
        except ImportError:
            raise ConfigError("data.name", "hf_disk", "needs the datasets package: pip install 'fmtrain[data]'") from None
        saved = folder.is_dir() and any((folder / marker).is_file() for marker in ("dataset_dict.json", "state.json"))
        if saved:
            try:
                found = datasets.load_from_disk(str(folder))
            except Exception as error:  # datasets' own: a damaged save
                raise DataError(folder, "", f"is not a folder datasets' save_to_disk wrote: {error}") from None
            if isinstance(found, datasets.DatasetDict):
                if self.cfg.split not in found:
                    splits = ", ".join(found)
                    raise ConfigError("data.split", self.cfg.split, f"{folder} has the splits {splits}")
                found = found[self.cfg.split]
            names = found.column_names
        else:
            found = self._load(folder, datasets)
            names = found.column_names or list(next(iter(found), {}))  # csv and text: known once read
        if self.cfg.packing != "concat":
            example_columns(self.cfg, names, folder)
        elif self.cfg.text_field not in names:
            listed = ", ".join(names[:20])
            raise DataError(folder, "", f"has no column {self.cfg.text_field!r} (data.text_field); its columns: {listed}")
        return found

    def _load(self, path: Path, datasets: Any) -> Any:
        """``load_dataset`` over a local folder of data files, or one file, streamed."""
        from fmtrain.config import cache_root

        if path.is_file():
            if path.suffix not in self.LOADERS:
                kinds = ", ".join(self.LOADERS)
                raise ConfigError("data.paths", str(path), f"data=hf_disk reads a datasets folder or a data file ({kinds})")
            args, files = (self.LOADERS[path.suffix],), {"data_files": [str(path)]}
        else:
            args, files = (str(path),), {}
        try:
            return datasets.load_dataset(
                *args, **files, split=self.cfg.split, streaming=True, cache_dir=str(cache_root() / "hf_datasets")
            )
        except ValueError as error:
            if "split" in str(error).lower():  # "Bad split: test. Available splits: ['train']"
                raise ConfigError("data.split", self.cfg.split, f"{path}: {error}") from None
            raise DataError(path, "", f"datasets.load_dataset cannot read it: {error}") from None
        except Exception as error:  # datasets' own: no data files, files it cannot parse
            raise DataError(path, "", f"datasets.load_dataset cannot read it: {type(error).__name__}: {error}") from None

    def _batches(self, folder: Path, columns: list[str]) -> Iterator[dict[str, list[Any]]]:
        """The columns a batch of rows at a time; a file that breaks mid-way is named, not a traceback."""
        rows = 0
        try:
            for batch in self._open(folder).select_columns(columns).iter(batch_size=BATCH_ROWS):
                yield batch
                rows += len(batch[columns[0]])
        except (DataError, ConfigError):
            raise
        except Exception as error:  # datasets' or pyarrow's: a malformed line in a streamed data file
            raise DataError(folder, f"after row {rows}", f"cannot be read: {type(error).__name__}: {error}") from None

    def records(self, bad: BadRecords) -> Iterator[tuple[Path, str, dict[str, Any]]]:
        for folder in self.folders():
            found = self._open(folder)
            columns = example_columns(self.cfg, found.column_names or list(next(iter(found), {})), folder)
            row = 0
            for batch in self._batches(folder, columns):
                for values in zip(*(batch[c] for c in columns), strict=True):
                    yield folder, f"row {row}", dict(zip(columns, values, strict=True))
                    row += 1

    def check(self) -> None:
        for folder in self.folders():
            if not folder.exists():
                raise ConfigError(
                    "data.paths", str(folder), "data=hf_disk reads folders datasets' save_to_disk wrote, or data files"
                )
            self._open(folder)

    def documents(self, bad: BadRecords, utf8: bool = False) -> Iterator[bytes]:
        key = self.cfg.text_field
        for folder in self.folders():
            row = 0
            for batch in self._batches(folder, [key]):
                for value in batch[key]:
                    if (text := _text(value, folder, f"row {row}", key, bad)) is not None:
                        yield text
                    row += 1


class Tokens(Source):
    """``data=tokens``: token ids already made, as nanoGPT's ``prepare.py`` writes them: raw ``.bin``
    files of ``data.dtype`` (nanoGPT: uint16), or ``.npy`` arrays (their own dtype), read as memmaps
    and trained on in order (give the training files: fmtrain holds out ``data.val_fraction`` itself)."""

    name = "tokens"
    kind = "tokens"

    def _array(self, path: Path) -> np.ndarray:
        if path.suffix == ".npy":
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as error:
                raise DataError(path, "", f"cannot be read as a .npy array: {error}") from None
            if array.ndim != 1 or array.dtype.kind not in "iu":
                raise DataError(path, "", f"holds a {array.dtype} array of shape {array.shape}, not one row of integer ids")
            return array
        itemsize = np.dtype(self.cfg.dtype).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise DataError(path, "", f"{size} bytes is not a whole number of {self.cfg.dtype} ids: is data.dtype right?")
        return np.memmap(path, dtype=self.cfg.dtype, mode="r") if size else np.zeros(0, dtype=self.cfg.dtype)

    def check(self) -> None:
        super().check()
        for path in self.files():
            self._array(path)

    def token_arrays(self) -> Iterator[tuple[Path, np.ndarray]]:
        for path in self.files():
            yield path, self._array(path)


# what an entry of data.mix may set besides its source's own keys
MIX_SHARED = ("val_fraction", "max_bytes", "shard_tokens", "on_bad_record")


def mix_components(cfg: DataConfig) -> list[tuple[DataConfig, float]]:
    """``data=mix``: each entry of ``data.mix`` as a source's settings of its own, and its weight.

    An entry holds ``name`` (a source), ``paths``, ``weight`` (> 0), the source's own keys and those of
    ``MIX_SHARED``; what it leaves out is the run's ``data`` settings. The tokenizer, ``seq_len`` and
    the cache folder are the run's.
    """
    import dataclasses
    import math

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fmtrain.config import check_domains

    if not cfg.mix:
        raise ConfigError("data.mix", cfg.mix, "give the sources to mix, e.g. [{name: jsonl, paths: [a.jsonl], weight: 3}, ...]")
    base = dataclasses.replace(cfg, name="text_files", paths=[], mix=[])
    found = []
    for index, entry in enumerate(cfg.mix):
        key = f"data.mix[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, entry, "each entry is a mapping: {name: SOURCE, paths: [...], weight: W, ...}")
        name, weight = entry.get("name"), entry.get("weight", 1.0)
        if name not in SOURCES or name in ("mix", "stdlib"):
            raise ConfigError(f"{key}.name", name, f"valid sources to mix are {', '.join(n for n in SOURCES if n != 'stdlib')}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{key}.weight", weight, "must be a positive finite number")
        allowed = {"name", "paths", "weight", *DataConfig.OPTIONS[name], *MIX_SHARED}
        for extra in sorted(set(entry) - allowed):
            valid = ", ".join(sorted(allowed))
            raise ConfigError(f"{key}.{extra}", entry[extra], f"an entry of data=mix with name={name} takes {valid}")
        settings = {k: v for k, v in entry.items() if k != "weight"}
        try:
            component = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), settings))
        except OmegaConfBaseException as error:
            raise ConfigError(key, entry, f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
        assert isinstance(component, DataConfig)
        check_domains(component, f"{key}.")
        if not component.paths:
            raise ConfigError(f"{key}.paths", component.paths, "give one or more files, directories or globs")
        found.append((component, float(weight)))
    return found


SOURCES: dict[str, type[Source]] = {
    "stdlib": TextFiles,
    "text_files": TextFiles,
    "jsonl": Jsonl,
    "parquet": Parquet,
    "hf_disk": HFDisk,
    "tokens": Tokens,
    "mix": Source,  # several of the above: mix_components()
}


def source_of(cfg: DataConfig) -> Source:
    if cfg.name == "mix":
        raise ValueError("data=mix has a source per entry: mix_components()")
    if cfg.name not in SOURCES:
        raise ConfigError("data.name", cfg.name, f"valid sources are {', '.join(SOURCES)}")
    return SOURCES[cfg.name](cfg)
