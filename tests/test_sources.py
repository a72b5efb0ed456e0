"""The data users have: text files, jsonl, parquet, datasets folders and token ids, through one tokenizer
contract (bytes, a tokenizer.json, one ``fmtrain tokenizer train`` makes), streamed, with bad records named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, fmtrain, killed_on_two_resumed_on_one, train_losses, write_source

from fmtrain.config import DataConfig
from fmtrain.data import cache_path, prepare
from fmtrain.sources import DataError
from fmtrain.tokenizer import Tokenizer
from fmtrain.tokenizer_train import EOS_TOKEN, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    f"Document {i}: " + "naïve café ☕ résumé, straße\n" * (i % 4 + 1) + f"def f(x):\n    return x * {i}\n" for i in range(80)
]
KINDS = ["text_files", "jsonl", "parquet", "hf_disk", "hf_files", "hf_csv", "tokens"]  # hf_*: data=hf_disk's load_dataset


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE trained on DOCS by fmtrain's own trainer."""
    folder = tmp_path_factory.mktemp("bpe")
    corpus = write_source("jsonl", folder / "corpus", DOCS)
    train_tokenizer(DataConfig(name="jsonl", paths=[str(corpus)]), vocab_size=300, out=folder / "tok")
    return folder / "tok"


def stream(cfg: DataConfig, vocab: int, tokenizer: Tokenizer) -> dict[str, bytes]:
    corpus = prepare(cfg, vocab, tokenizer)
    return {split: b"".join((corpus.directory / name).read_bytes() for name in corpus.meta[split]) for split in ("train", "val")}


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "bpe"])
def test_every_source_holding_the_same_text_gives_the_same_token_stream(tokenizer_kind: str, bpe: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer(bpe / "tokenizer.json") if tokenizer_kind == "bpe" else Tokenizer()
    vocab = 300 if tokenizer_kind == "bpe" else 256
    streams = {}
    for kind in KINDS:
        path = write_source(kind, tmp_path / kind, DOCS, tokenizer)
        name = "hf_disk" if kind.startswith("hf_") else kind
        cfg = DataConfig(name=name, paths=[str(path)], cache_dir=str(tmp_path / "cache"), val_fraction=0.1, shard_tokens=1000)
        streams[kind] = stream(cfg, vocab, tokenizer)
    reference = streams["text_files"]
    expected = tokenizer.encode([d.encode() for d in DOCS])
    assert len(reference["train"]) + len(reference["val"]) == len(expected) * (2 if vocab > 256 else 1)
    assert reference["val"] and reference["train"]
    for kind in KINDS:
        assert streams[kind] == reference, kind
    # Each source cached under its own key: five builds, not one reused.
    assert len(list((tmp_path / "cache").iterdir())) == len(KINDS)


def test_a_trained_tokenizer_loads_through_the_contract_and_in_transformers(bpe: Path) -> None:
    import transformers

    ours = Tokenizer(bpe / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(str(bpe))
    assert ours.vocab_size == len(theirs) == 300
    assert ours.eos == theirs.eos_token_id == theirs.convert_tokens_to_ids(EOS_TOKEN)
    for text in (DOCS[3], "unseen wörds ✓ 12345", "\n\n  tabs\tand spaces  "):
        ids = ours.encode([text.encode()]).tolist()
        assert ids == theirs(text)["input_ids"] + [theirs.eos_token_id]
        assert theirs.decode(ids[:-1]) == text  # byte-level: every input round-trips, no unknown token
    record = json.loads((bpe / "training.json").read_text())
    assert record["documents"] == len(DOCS) and record["vocab_size"] == 300


def test_the_data_cache_is_rebuilt_when_the_tokenizer_file_changes(tmp_path: Path) -> None:
    corpus = write_source("jsonl", tmp_path / "corpus", DOCS)
    cfg = DataConfig(name="jsonl", paths=[str(corpus)], cache_dir=str(tmp_path / "cache"))
    train_tokenizer(cfg, vocab_size=290, out=tmp_path / "tok")
    first = cache_path(cfg, 512, Tokenizer(tmp_path / "tok" / "tokenizer.json"))
    prepare(cfg, 512, Tokenizer(tmp_path / "tok" / "tokenizer.json"))
    train_tokenizer(cfg, vocab_size=320, out=tmp_path / "tok")  # the same folder, another vocabulary
    second = cache_path(cfg, 512, Tokenizer(tmp_path / "tok" / "tokenizer.json"))
    assert first != second and (first / "meta.json").is_file() and not second.exists()
    rebuilt = prepare(cfg, 512, Tokenizer(tmp_path / "tok" / "tokenizer.json"))
    assert rebuilt.directory == second and rebuilt.meta["tokens"] < json.loads((first / "meta.json").read_text())["tokens"]
    # The EOS (tokenizer_config.json) decides ids too: another EOS, another cache.
    settings = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "<|pad|>"}))
    third = prepare(cfg, 512, Tokenizer(tmp_path / "tok" / "tokenizer.json"))
    assert third.directory not in (first, second) and third.meta["tokens"] == rebuilt.meta["tokens"]


GOOD = [json.dumps({"text": d}).encode() for d in DOCS[:6]]


def jsonl_with(bad_line: bytes, at: int = 2) -> bytes:
    lines = [*GOOD[:at], bad_line, *GOOD[at:]]
    return b"\n".join(lines) + b"\n\n"  # a blank line at the end is no record


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"{not json}", "not JSON"),
        (b'{"body": "x"}', "no field 'text' (data.text_field); its fields: 'body'"),
        (b'{"text": 5}', "field 'text' is int, not text"),
        (b'{"text": ""}', "field 'text' is empty"),
        (b'{"text": null}', "field 'text' is null"),
        (b'{"text": "caf\xe9"}', "not UTF-8 (byte 13 of the line)"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"text": "\\ud800"}', "field 'text' is not valid Unicode (surrogates not allowed at character 0)"),
    ],
)
def test_a_bad_jsonl_record_is_named_or_skipped_and_counted(line: bytes, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(jsonl_with(line))
    cfg = DataConfig(name="jsonl", paths=[str(path)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as error:
        prepare(cfg, 256)
    assert str(error.value).startswith(f"{path}, line 3: {problem}")
    assert "data.on_bad_record=skip" in str(error.value)
    skipped = prepare(DataConfig(**{**cfg.__dict__, "on_bad_record": "skip"}), 256)
    assert skipped.meta["bad_records"]["count"] == 1 and problem in skipped.meta["bad_records"]["first"][0]
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join(GOOD) + b"\n")
    reference = stream(DataConfig(name="jsonl", paths=[str(clean)], cache_dir=str(tmp_path / "cache")), 256, Tokenizer())
    assert stream(DataConfig(**{**cfg.__dict__, "on_bad_record": "skip"}), 256, Tokenizer()) == reference


def test_a_text_file_that_is_not_utf8_is_named_for_a_tokenizer_and_read_as_bytes_without(bpe: Path, tmp_path: Path) -> None:
    write_source("text_files", tmp_path, DOCS[:6])
    (tmp_path / "text" / "doc_0003.txt").write_bytes("Grüße aus Köln\n".encode("latin-1"))
    cfg = DataConfig(name="text_files", paths=[str(tmp_path / "text")], cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    tokenizer = Tokenizer(bpe / "tokenizer.json")
    with pytest.raises(DataError, match=r"doc_0003.txt, byte 2: not UTF-8, which a tokenizer reads"):
        prepare(cfg, 300, tokenizer)
    skipped = prepare(DataConfig(**{**cfg.__dict__, "on_bad_record": "skip"}), 300, tokenizer)
    assert skipped.meta["bad_records"]["count"] == 1
    assert prepare(cfg, 256).meta["tokens"] == sum(p.stat().st_size + 1 for p in (tmp_path / "text").iterdir()) - 1  # bytes


def test_bad_parquet_rows_and_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fmtrain.sources import source_of

    rows = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a document", None, "another", "", "third"]}), rows)
    cfg = DataConfig(name="parquet", paths=[str(rows)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"rows.parquet, row 1: field 'text' is null"):
        prepare(cfg, 256)
    skipped = prepare(DataConfig(**{**cfg.__dict__, "on_bad_record": "skip"}), 256)
    assert skipped.meta["bad_records"]["count"] == 2  # the null and the empty one
    assert skipped.meta["tokens"] == len(b"a document\0another\0third")
    # A file the column is missing from, or not of strings, or not parquet: an error even with skip.
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocolumn.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    for name, problem in [
        ("nocolumn", "has no column 'text' (data.text_field); its columns: body"),
        ("ints", "column 'text' holds int64, not strings"),
        ("garbage", "cannot be read as parquet"),
    ]:
        bad = DataConfig(name="parquet", paths=[str(tmp_path / f"{name}.parquet")], on_bad_record="skip")
        with pytest.raises(DataError) as error:
            source_of(bad).check()
        assert str(error.value).startswith(f"{tmp_path / name}.parquet: {problem}")


def test_bad_datasets_folders_and_token_files(tmp_path: Path) -> None:
    import datasets

    from fmtrain.config import ConfigError
    from fmtrain.sources import source_of

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"data.split='test' is invalid: .*dd has the splits train"):
        source_of(DataConfig(name="hf_disk", paths=[str(tmp_path / "dd")], split="test")).check()
    with pytest.raises(DataError, match=r"dd: has no column 'text' \(data.text_field\); its columns: content"):
        source_of(DataConfig(name="hf_disk", paths=[str(tmp_path / "dd")])).check()
    (tmp_path / "dd" / "dataset_dict.json").write_text("{not json")
    with pytest.raises(DataError, match="dd: is not a folder datasets' save_to_disk wrote"):
        source_of(DataConfig(name="hf_disk", paths=[str(tmp_path / "dd")])).check()
    # Folders of data files and single files go through load_dataset, locally: its errors are named too.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match=r"blobs: datasets.load_dataset cannot read it"):
        source_of(DataConfig(name="hf_disk", paths=[str(tmp_path / "blobs")])).check()
    np.zeros(2, np.uint8).tofile(tmp_path / "odd.bin")
    with pytest.raises(ConfigError, match=r"data.paths='.*odd.bin' is invalid: data=hf_disk reads a datasets folder or a data"):
        source_of(DataConfig(name="hf_disk", paths=[str(tmp_path / "odd.bin")])).check()
    files = write_source("hf_files", tmp_path / "hub", ["a", "b"])
    with pytest.raises(ConfigError, match=r"data.split='validation' is invalid: .*files: Bad split: .*splits: .*train.*test"):
        source_of(DataConfig(name="hf_disk", paths=[str(files)], split="validation")).check()
    held_out = prepare(
        DataConfig(name="hf_disk", paths=[str(files)], split="test", cache_dir=str(tmp_path / "c1"), val_fraction=0.5), 256
    )
    assert held_out.meta["tokens"] == len("held out")  # the test split's one document, not the train split's
    (files / "train-00001.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"files, after row \d+: cannot be read"):
        prepare(DataConfig(name="hf_disk", paths=[str(files)], cache_dir=str(tmp_path / "c1")), 256)

    np.array([1, 2, 3], dtype=np.uint16).tofile(tmp_path / "odd.bin")
    with pytest.raises(DataError, match=r"6 bytes is not a whole number of uint32 ids: is data.dtype right\?"):
        source_of(DataConfig(name="tokens", paths=[str(tmp_path / "odd.bin")], dtype="uint32")).check()
    np.save(tmp_path / "grid.npy", np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(DataError, match=r"holds a int32 array of shape \(2, 3\), not one row of integer ids"):
        source_of(DataConfig(name="tokens", paths=[str(tmp_path / "grid.npy")])).check()
    ids = np.arange(1000, dtype=np.uint16) % 256
    ids[700] = 300
    ids.tofile(tmp_path / "big.bin")
    cfg = DataConfig(name="tokens", paths=[str(tmp_path / "big.bin")], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"big.bin, id 700: 300 is outside the vocabulary 0..255 \(model.vocab_size\)"):
        prepare(cfg, 256)
    # .npy arrays carry their own dtype: the same ids as a .bin of data.dtype.
    ids[700] = 7
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    ids.tofile(tmp_path / "ok.bin")
    as_npy = stream(
        DataConfig(name="tokens", paths=[str(tmp_path / "ids.npy")], cache_dir=str(tmp_path / "c2")), 256, Tokenizer()
    )
    as_bin = stream(DataConfig(name="tokens", paths=[str(tmp_path / "ok.bin")], cache_dir=str(tmp_path / "c2")), 256, Tokenizer())
    assert as_npy == as_bin and sum(map(len, as_bin.values())) == 1000


def test_foreign_keys_of_another_source_are_refused() -> None:
    from launch.compose import UsageError, compose

    with pytest.raises(UsageError, match=r"data.dtype='uint16' is invalid: a key of data=tokens, not of data=jsonl"):
        compose(["data=jsonl", "data.paths=[x.jsonl]", "data.dtype=uint16"], check=False)


STREAMING = """
import os, resource, sys
from fmtrain.config import DataConfig
from fmtrain.data import prepare

path, cache, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
status = open("/proc/self/status").read().split("\\n")
data = int(next(line for line in status if line.startswith("VmData")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (data + headroom, data + headroom))
try:
    bytearray(os.path.getsize(path))  # the limit holds: the input cannot be held in memory
    print("not limited")
except MemoryError:
    pass
corpus = prepare(DataConfig(name="jsonl", paths=[path], cache_dir=cache, max_bytes=1 << 40), 256)
print(corpus.meta["tokens"])
"""


def test_a_jsonl_larger_than_the_memory_limit_is_tokenized_as_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * 4000 + " the end"}) + "\n"
    count = (160 << 20) // len(line)
    with open(path, "w") as out:
        for _ in range(count):
            out.write(line)
    headroom = 96 << 20  # well below the file's 160 MiB
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(STREAMING))
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "cache"), str(headroom)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(count * 4009 - 1)]  # each document's bytes, a 0 between them


def test_tokenizer_train_then_train_on_jsonl_equals_training_on_its_token_ids(tmp_path: Path, cache_dir: Path) -> None:
    corpus = write_source("jsonl", tmp_path / "corpus", DOCS * 4)
    made = fmtrain(
        ["tokenizer", "train", "data=jsonl", f"data.paths=[{corpus}]", "tokenizer.vocab_size=320", f"out={tmp_path / 'tok'}"],
        cache_dir,
    )
    assert made.returncode == 0, made.stderr
    assert f"data.tokenizer={tmp_path / 'tok'} model.vocab_size=320" in made.stdout
    ids = write_source("tokens", tmp_path / "ids", DOCS * 4, Tokenizer(tmp_path / "tok" / "tokenizer.json"))
    common = [*SMALL, "trainer.max_steps=4", "data.seq_len=32", "model.vocab_size=320", f"data.tokenizer={tmp_path / 'tok'}"]
    runs = {}
    for kind, path in (("jsonl", corpus), ("tokens", ids)):
        result = fmtrain(["train", f"data={kind}", f"data.paths=[{path}]", f"run_dir={tmp_path / kind}", *common], cache_dir)
        assert result.returncode == 0, result.stderr
        runs[kind] = train_losses(tmp_path / kind)
    assert len(runs["jsonl"]) == 4 and runs["jsonl"] == runs["tokens"]


def test_bad_input_is_refused_before_launch_or_ends_the_run_naming_the_record(tmp_path: Path, cache_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocolumn.parquet")
    data = ["data=parquet", f"data.paths=[{tmp_path / 'nocolumn.parquet'}]"]
    refused = fmtrain(["train", *data, f"run_dir={tmp_path / 'refused'}", *SMALL], cache_dir)
    assert refused.returncode == 2 and "nocolumn.parquet: has no column 'text'" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()  # the run it was given: not made
    path = tmp_path / "docs.jsonl"
    path.write_bytes(jsonl_with(b'{"txt": "typo"}', at=5))
    failed = fmtrain(["train", "data=jsonl", f"data.paths=[{path}]", f"run_dir={tmp_path / 'run'}", *SMALL], cache_dir)
    assert failed.returncode != 0 and f"{path}, line 6: no field 'text'" in failed.stderr
    assert "Traceback" not in failed.stderr


def mixture(tmp_path: Path, weights: tuple[float, float] = (3, 1)) -> DataConfig:
    """Two sources of different sizes, a jsonl of DOCS and a parquet of other text."""
    other = [f"Other text {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 2) for i in range(120)]
    a, b = write_source("jsonl", tmp_path / "a", DOCS), write_source("parquet", tmp_path / "b", other)
    mix = [
        {"name": "jsonl", "paths": [str(a)], "weight": weights[0]},
        {"name": "parquet", "paths": [str(b)], "weight": weights[1]},
    ]
    return DataConfig(name="mix", mix=mix, cache_dir=str(tmp_path / "cache"))


def test_a_mixture_samples_each_source_by_weight_once_per_epoch_whatever_the_world_size(tmp_path: Path) -> None:
    from fmtrain.data import Mixture

    corpus = prepare(mixture(tmp_path), 256)
    assert isinstance(corpus, Mixture)
    sampler = corpus.sampler(seq_len=16, seed=5)
    n_a, n_b = sampler.counts
    blocks = -(-max(n_a * 4 // 3, n_b * 4) * 2 // sampler.BLOCK)  # two epochs of each source at least
    total = blocks * sampler.BLOCK
    windows = [sampler._window_of(g) for g in range(total)]
    from_a = [w for w in windows if w < n_a]
    assert len(from_a) == 3 * total // 4  # exactly its share in every block
    # Each source goes through all its windows once per epoch, whatever the other does.
    first_epoch = from_a[:n_a]
    assert sorted(first_epoch) == list(range(n_a)) and from_a[n_a : 2 * n_a] != first_epoch
    from_b = [w - n_a for w in windows if w >= n_a]
    assert sorted(from_b[:n_b]) == list(range(n_b))
    # A fresh sampler (a resume) and another split of the global batch over ranks give the same rows.
    again = mixture(tmp_path)
    whole = prepare(again, 256).sampler(16, 5).micro_batch(consumed=96, micro_step=0, rank=0, micro_batch=8, world_size=1)
    parts = [sampler.micro_batch(consumed=96, micro_step=0, rank=r, micro_batch=4, world_size=2) for r in (0, 1)]
    assert np.array_equal(whole["input_ids"].numpy(), np.concatenate([p["input_ids"].numpy() for p in parts]))
    # The validation windows: each source's share by weight, from its own part of the split.
    ids = corpus.eval_ids(16, 40)
    val_a = corpus.val.num_windows(16) - corpus.parts[1].val.num_windows(16)
    assert len(ids) == 40 and sum(i < val_a for i in ids) == 30


def test_bad_mixtures_are_refused_naming_the_entry(tmp_path: Path) -> None:
    from launch.compose import UsageError, compose

    a = write_source("jsonl", tmp_path, DOCS[:3])
    cases = [
        ("[]", "data.mix=[] is invalid: give the sources to mix"),
        (f"[{{name: jsonl, paths: [{a}], weight: 0}}]", "data.mix[0].weight=0 is invalid: must be a positive finite number"),
        (f"[{{name: nope, paths: [{a}]}}]", "data.mix[0].name='nope' is invalid: valid sources to mix are text_files, jsonl"),
        (f"[{{name: jsonl, paths: [{a}], dtype: uint8}}]", "data.mix[0].dtype='uint8' is invalid: an entry of data=mix"),
        ("[{name: jsonl}]", "data.mix[0].paths=[] is invalid"),
        (f"[{{name: jsonl, paths: [{a}]}}, {{name: parquet, paths: [{a}]}}]", "cannot be read as parquet"),
        (f"[{{name: jsonl, paths: [{a}], max_bytes: -5}}]", "data.mix[0].max_bytes=-5 is invalid"),
    ]
    for mix, message in cases:
        with pytest.raises(UsageError) as error:
            compose(["data=mix", f"data.mix={mix}", *SMALL], check=True)
        assert message in str(error.value), (mix, str(error.value))


def test_a_mixture_killed_on_two_ranks_resumes_exactly_on_one(tmp_path: Path, cache_dir: Path) -> None:
    cfg = mixture(tmp_path)
    mix = json.dumps(cfg.mix).replace('"', "")
    args = [*SMALL, "data=mix", f"data.mix={mix}", "trainer.max_steps=30", "checkpoint.interval=10", "data.seq_len=64"]
    killed_on_two_resumed_on_one(args, tmp_path / "killed", tmp_path / "ref", cache_dir, steps=30, at=10)
