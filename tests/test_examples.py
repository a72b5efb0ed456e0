"""Fine-tuning examples (data.packing=none): prompt/completion and chat records, only answers in the loss,
the loss the mean over the global batch's answer tokens, exact resume; bad records named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, fmtrain, killed_on_two_resumed_on_one, train_losses

from fmtrain.config import ConfigError, DataConfig
from fmtrain.data import prepare
from fmtrain.losses import cross_entropy
from fmtrain.sources import DataError
from fmtrain.tokenizer import Tokenizer
from fmtrain.tokenizer_train import train_tokenizer

SEQ = 48


def records() -> list[dict]:
    found = []
    for i in range(60):
        a, b = i * 7 % 97, i * 13 % 89
        if i % 2:
            found.append({"prompt": f"What is {a} plus {b}? ", "completion": f"It is {a + b}."})
        else:
            system = [{"role": "system", "content": "You add numbers."}] if i % 4 == 0 else []
            turns = [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
            found.append(
                {"messages": [*system, *turns, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]}
            )
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples.jsonl and a BPE from fmtrain tokenizer train (chatml's markers single tokens)."""
    root = tmp_path_factory.mktemp("examples")
    (root / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": json.dumps(r)}) + "\n" for r in records() * 3))
    train_tokenizer(DataConfig(name="jsonl", paths=[str(root / "text.jsonl")]), vocab_size=320, out=root / "tok")
    return root


def config(folder: Path, tmp_path: Path, **extra: object) -> DataConfig:
    fields = {"name": "jsonl", "paths": [str(folder / "examples.jsonl")], "packing": "none", "seq_len": SEQ}
    return DataConfig(
        **{**fields, "tokenizer": str(folder / "tok"), "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.2, **extra}
    )


def test_only_the_answers_are_targets_and_the_masked_loss_is_their_cross_entropy(folder: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer(folder / "tok" / "tokenizer.json")
    corpus = prepare(config(folder, tmp_path), 320, tokenizer)
    shards = corpus.train
    n = shards.num_windows(SEQ)
    assert n + corpus.val.num_windows(SEQ) == 60
    batch = shards.batch(list(range(n)), SEQ)
    # Every target token decodes to an answer: the completion and EOS, or each assistant turn.
    answers = {f"It is {a}." for a in range(200)} | {str(a) for a in range(200)} | {"Yes."}
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(folder / "tok" / "tokenizer.json"))
    eos = tokenizer.eos
    for row in range(n):
        targets = batch["labels"][row][batch["loss_mask"][row] == 1].tolist()
        spans, current = [], []
        for token in targets:
            current.append(token)
            if token == eos:
                spans.append(hf.decode(current[:-1], skip_special_tokens=False))
                current = []
        assert not current and spans, row
        for span in spans:
            assert span.replace("<|im_end|>\n", "") in answers, span
    # The masked loss is the mean cross-entropy over exactly those tokens, computed by hand.
    torch.manual_seed(0)
    logits = torch.randn(n, SEQ, 320)
    by_hand = []
    for row in range(n):
        for position in range(SEQ):
            if batch["loss_mask"][row, position]:
                target = batch["labels"][row, position]
                by_hand.append(-torch.log_softmax(logits[row, position], -1)[target])
    assert float(cross_entropy(logits, batch)) == pytest.approx(float(torch.stack(by_hand).mean()), rel=1e-6)
    # train_on_prompt=true: every real token counts; the loss is the unmasked one over non-padding.
    everything = prepare(config(folder, tmp_path, train_on_prompt=True), 320, tokenizer).train.batch(list(range(n)), SEQ)
    real = everything["loss_mask"] == 1
    lengths = [int(shards.offsets[i + 1] - shards.offsets[i]) for i in range(n)]
    assert real.sum(1).tolist() == [min(length, SEQ + 1) - 1 for length in lengths]
    unmasked = F.cross_entropy(logits[real], everything["labels"][real])
    assert float(cross_entropy(logits, everything)) == pytest.approx(float(unmasked), rel=1e-6)


def test_chat_examples_render_as_transformers_renders_the_template(folder: Path, tmp_path: Path) -> None:
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(str(folder / "tok"))
    tokenizer = Tokenizer(folder / "tok" / "tokenizer.json")
    corpus = prepare(config(folder, tmp_path), 320, tokenizer)
    chats = [r for r in records() if "messages" in r]
    ours = [
        shards.ids[shards.offsets[i] : shards.offsets[i + 1]].tolist()
        for shards in (corpus.train, corpus.val)
        for i in range(shards.num_windows(SEQ))
    ]
    expected = theirs.apply_chat_template(chats[1]["messages"], tokenize=True)
    expected = list(expected["input_ids"]) if "input_ids" in expected else list(expected)
    # The same ids, but for the tokenizer's EOS fmtrain adds after each assistant turn (chatml ends them with <|im_end|>).
    assert any(_without(example, tokenizer.eos) == expected for example in ours), "no example renders as transformers does"


def _without(ids: list[int], token: int | None) -> list[int]:
    return [i for i in ids if i != token]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"messages": "hi"}, "field 'messages' is not a list of messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant message: nothing to learn"),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "message 0 is not {role: system|user|assistant|tool, content: text}",
        ),
        ({"prompt": "hi"}, "field 'completion' is missing, not text"),
        ({"prompt": "hi", "completion": ""}, "field 'completion' is empty"),
        ({"prompt": 3, "completion": "x"}, "field 'prompt' is int, not text"),
        ({"question": "hi"}, "has neither prompt and completion, messages nor a 'text' text; its fields: 'question'"),
        ({"prompt": " ".join(map(str, range(200))), "completion": "y"}, "has no answer token left to learn"),
    ],
)
def test_a_bad_example_is_named_or_skipped(record: dict, problem: str, folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = [json.dumps(r) for r in records()[:20]]
    path.write_text("\n".join([*good[:4], json.dumps(record), *good[4:]]) + "\n")
    cfg = DataConfig(
        name="jsonl", paths=[str(path)], packing="none", seq_len=SEQ, cache_dir=str(tmp_path / "c"), val_fraction=0.2
    )
    tokenizer = Tokenizer(folder / "tok" / "tokenizer.json")
    with pytest.raises(DataError) as error:
        prepare(cfg, 320, tokenizer)
    assert str(error.value).startswith(f"{path}, line 5: {problem}")
    skipped = prepare(DataConfig(**{**cfg.__dict__, "on_bad_record": "skip"}), 320, tokenizer)
    assert skipped.meta["bad_records"]["count"] == 1 and sum(skipped.meta["examples"].values()) == 20


def test_overlong_examples_are_truncated_or_dropped_and_counted(folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "p", "completion": "answer " * (i % 3 * 10 + 1)} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"name": "jsonl", "paths": [str(path)], "packing": "none", "seq_len": 32, "cache_dir": str(tmp_path / "c")}
    truncated = prepare(DataConfig(**base, val_fraction=0.2), 256)
    dropped = prepare(DataConfig(**base, val_fraction=0.2, overlong="drop"), 256)
    assert truncated.meta["overlong"] == {"truncated": 20, "dropped": 0} and sum(truncated.meta["examples"].values()) == 30
    assert dropped.meta["overlong"] == {"truncated": 0, "dropped": 20} and sum(dropped.meta["examples"].values()) == 10


def test_packing_needs_records_and_a_template_that_exists(folder: Path) -> None:
    from fmtrain.validation import validate_data

    with pytest.raises(ConfigError, match=r"data.packing='none' is invalid: reads examples from records"):
        validate_data(DataConfig(name="text_files", paths=[str(folder / "text.jsonl")], packing="none"))
    with pytest.raises(ConfigError, match=r"data.chat_template='/no/such.jinja' is invalid"):
        validate_data(
            DataConfig(name="jsonl", paths=[str(folder / "examples.jsonl")], packing="none", chat_template="/no/such.jinja")
        )


def run_args(folder: Path, run_dir: Path, *extra: str, packing: str = "none") -> list[str]:
    data = ["data=jsonl", f"data.paths=[{folder / 'examples.jsonl'}]", f"data.packing={packing}", f"data.seq_len={SEQ}"]
    data += [f"data.tokenizer={folder / 'tok'}", "model.vocab_size=320", "data.val_fraction=0.2"]
    return ["train", f"run_dir={run_dir}", *SMALL, *data, "trainer.global_batch_size=8", *extra]


@pytest.mark.parametrize("packing", ["none", "bfd"])
def test_the_loss_weighs_every_answer_token_alike_whatever_the_micro_batches_and_ranks(
    packing: str, folder: Path, tmp_path: Path, cache_dir: Path
) -> None:
    runs = {
        "whole": ["trainer.micro_batch_size=8"],
        # 2 ranks x 4 micro-batches of one example each: unequal answer lengths in every one
        "accumulated on two ranks": ["launcher.nproc=2", "trainer.micro_batch_size=1"],
    }
    losses = {}
    for name, extra in runs.items():
        result = fmtrain(run_args(folder, tmp_path / name, "trainer.max_steps=3", *extra, packing=packing), cache_dir)
        assert result.returncode == 0, result.stderr
        losses[name] = train_losses(tmp_path / name)
    shown = re.search(rf"data.packing={packing}: (\d+) rows of 49, ([\d.]+)% real tokens", result.stderr + result.stdout)
    share = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[0])["data_real_token_share"]
    assert shown and share == pytest.approx(float(shown.group(2)) / 100, abs=1e-3)
    assert shown and (int(shown.group(1)) == 60 if packing == "none" else int(shown.group(1)) < 60), shown
    for step, loss in losses["whole"].items():
        assert losses["accumulated on two ranks"][step] == pytest.approx(loss, rel=1e-5), step


def test_packed_chat_examples_killed_on_two_ranks_resume_exactly_on_one(folder: Path, tmp_path: Path, cache_dir: Path) -> None:
    # packed rows; data.packing=none's examples go through the same sampler, one a row
    args = run_args(folder, tmp_path, "trainer.max_steps=24", "checkpoint.interval=8", packing="bfd")[2:]  # no train, run_dir
    killed_on_two_resumed_on_one(args, tmp_path / "killed", tmp_path / "ref", cache_dir, steps=24, at=8)


def test_best_fit_decreasing_places_every_example_once_within_capacity() -> None:
    from fmtrain.examples import best_fit_decreasing

    members, starts = best_fit_decreasing(np.array([5, 3, 4, 2, 6]), 10)
    bins = [members[starts[i] : starts[i + 1]].tolist() for i in range(len(starts) - 1)]
    assert bins == [[4, 2], [0, 1, 3]]  # 6+4; then 5, 3 and 2 fill the second exactly
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.pareto(1.5, 500).astype(int) * 8 + 4, 64)  # skewed: mostly short, some long
    members, starts = best_fit_decreasing(lengths, 64)
    assert sorted(members.tolist()) == list(range(500))
    loads = [int(lengths[members[starts[i] : starts[i + 1]]].sum()) for i in range(len(starts) - 1)]
    assert max(loads) <= 64 and len(loads) < 500 / 3  # far fewer rows than one example each
    assert sum(loads) / (64 * len(loads)) > 0.9


def test_packed_examples_give_the_logits_each_gives_alone(folder: Path, tmp_path: Path) -> None:
    from fmtrain.config import ModelConfig
    from fmtrain.examples import PackedShards
    from fmtrain.models.llama import Transformer

    tokenizer = Tokenizer(folder / "tok" / "tokenizer.json")
    packed = prepare(config(folder, tmp_path, packing="bfd"), 320, tokenizer)
    alone = prepare(config(folder, tmp_path), 320, tokenizer)
    shards = packed.train
    assert isinstance(shards, PackedShards) and shards.num_windows(SEQ) < alone.train.num_windows(SEQ)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    model.init_weights(seed=3)
    batch = shards.batch(list(range(shards.num_windows(SEQ))), SEQ)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        compared = 0
        for row in range(len(batch["input_ids"])):
            documents = batch["document_ids"][row]
            for number in range(int(documents.max()) + 1):
                where = (documents == number).nonzero().flatten()
                tokens = batch["input_ids"][row, where]
                assert batch["position_ids"][row, where].tolist() == list(range(len(where)))
                torch.testing.assert_close(logits[row, where], model(tokens[None])[0], rtol=0, atol=1e-5)
                compared += 1
        assert compared == len(shards.members)  # every training example, each in one row
        # The same answer tokens as each example padded alone: the same loss.
        unpacked = alone.train.batch(list(range(alone.train.num_windows(SEQ))), SEQ)
        assert int(batch["loss_mask"].sum()) == int(unpacked["loss_mask"].sum())
        packed_loss = cross_entropy(logits, batch)
        alone_loss = cross_entropy(model(unpacked["input_ids"]), unpacked)
    assert float(packed_loss) == pytest.approx(float(alone_loss), rel=1e-5)


def cache_files(corpus: object) -> dict[str, bytes]:
    directory = corpus.directory  # type: ignore[attr-defined]
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_tokenizing_in_worker_processes_gives_the_same_cache_in_order_and_logs_its_progress(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Small batches and chunks: many of them in flight at once, so their order matters.
    monkeypatch.setattr("fmtrain.data.ENCODE_BATCH_BYTES", 300)
    monkeypatch.setattr("fmtrain.examples.CHUNK_RECORDS", 4)
    lines = (folder / "examples.jsonl").read_text().splitlines(keepends=True)
    lines[9], lines[30] = "not json\n", json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n"
    (tmp_path / "bad.jsonl").write_text("".join(lines))
    tokenizer = Tokenizer(folder / "tok" / "tokenizer.json")
    builds = {
        "text": {"packing": "concat", "paths": [str(folder / "text.jsonl")], "shard_tokens": 500},
        "chat": {"packing": "bfd", "paths": [str(tmp_path / "bad.jsonl")], "on_bad_record": "skip"},
    }
    for name, settings in builds.items():
        caches = {}
        for workers in (1, 3):
            cfg = config(folder, tmp_path / f"{name}{workers}", num_workers=workers, **settings)
            with caplog.at_level("INFO", logger="fmtrain"):
                caches[workers] = cache_files(prepare(cfg, 320, tokenizer))
            assert re.search(rf"data: tokenized .* in [\d.]+ s: .*, {workers} workers?$", caplog.messages[-1]), caplog.messages
        assert caches[3] == caches[1], name  # meta.json too: the same counts, the same first bad records
        assert len(caches[1]) > 3 if name == "text" else json.loads(caches[1]["meta.json"])["bad_records"]["count"] == 2
    # data.on_bad_record=error: the first bad record in the file is the one named, whatever the workers.
    for workers in (1, 3):
        with pytest.raises(DataError, match=r"bad.jsonl, line 10: not JSON"):
            cfg = config(folder, tmp_path / f"error{workers}", num_workers=workers, paths=[str(tmp_path / "bad.jsonl")])
            prepare(cfg, 320, tokenizer)
    # A template that cannot render is its own error before any worker starts, not a broken pool.
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match=r"data\.chat_template"):
        prepare(config(folder, tmp_path / "broken", num_workers=2, chat_template=str(tmp_path / "broken.jinja")), 320, tokenizer)


def test_a_chat_fine_tune_exports_its_template_and_transformers_renders_the_ids_it_trained_on(
    folder: Path, tmp_path: Path, cache_dir: Path
) -> None:
    import transformers

    template = tmp_path / "plain.jinja"  # not the tokenizer folder's chatml: data.chat_template names it
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    run_dir = tmp_path / "run"
    args = run_args(folder, run_dir, "trainer.max_steps=2", f"data.chat_template={template}", packing="bfd")
    trained = fmtrain(args, cache_dir)
    assert trained.returncode == 0, trained.stderr
    exported = fmtrain(["export", str(run_dir)], cache_dir)
    assert exported.returncode == 0, exported.stderr
    out = Path(exported.stdout.strip().splitlines()[-1])
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    tokenizer = Tokenizer(folder / "tok" / "tokenizer.json")
    eos = tokenizer.eos
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos == theirs.eos_token_id
    cfg = config(folder, tmp_path, packing="none", chat_template=str(template))
    corpus = prepare(cfg, 320, tokenizer)
    chat = [r for r in records() if "messages" in r][1]  # no system turn: within SEQ whole
    expected = theirs.apply_chat_template(chat["messages"], tokenize=True)
    expected = list(expected["input_ids"]) if "input_ids" in expected else list(expected)
    ours = [
        shards.ids[shards.offsets[i] : shards.offsets[i + 1]].tolist()
        for shards in (corpus.train, corpus.val)
        for i in range(shards.num_windows(SEQ))
    ]
    # What fmtrain trained on is what the exported tokenizer renders, but for the EOS it adds after each
    # assistant turn (this template ends none with it): the exported model learnt to stop there.
    assert _without(expected, eos) == expected and any(_without(o, eos) == expected for o in ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == eos and json.loads((out / "verification.json").read_text())["max_abs_logit_diff"] < 1e-5


def test_a_chat_is_tokenized_whole_so_sentencepiece_sees_the_text_transformers_would(tmp_path: Path) -> None:
    import sentencepiece
    from test_pretrained import save_sentencepiece

    from fmtrain.examples import ExampleEncoder
    from fmtrain.sources import BadRecords

    save_sentencepiece(tmp_path / "sp", vocab_size=400)
    template = tmp_path / "plain.jinja"  # turns meet mid-line: "assistant: " then the answer
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tokenizer = Tokenizer(tmp_path / "sp" / "tokenizer.model")
    encoder = ExampleEncoder(DataConfig(packing="none", chat_template=str(template)), tokenizer)
    messages = [
        {"role": "user", "content": "Is x odd?"},
        {"role": "assistant", "content": "Yes, it is."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Quite."},
    ]
    encoded = encoder.encode({"messages": messages}, tmp_path / "chats.jsonl", "line 1", BadRecords())
    assert encoded is not None
    ids, mask = encoded
    rendered = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp" / "tokenizer.model"))
    eos = tokenizer.eos
    # One rendering, one encoding: SentencePiece's word-start marks where the text has them, not one more a turn.
    assert _without(ids, eos) == sp.encode(rendered) and ids.count(eos) == 2
    targets = sp.decode([i for i, m in zip(ids, mask, strict=True) if m and i != eos])
    assert "Yes, it is." in targets and "Quite." in targets and "odd" not in targets and "Sure" not in targets
    assert [i for i, m in zip(ids, mask, strict=True) if m and i == eos] == [eos, eos]  # each assistant turn ends with EOS


@pytest.mark.parametrize("packing", ["none", "bfd"])
def test_a_mixture_of_chat_and_prompt_completion_sources_draws_each_by_weight(
    packing: str, folder: Path, tmp_path: Path, cache_dir: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fmtrain.data import MixedBatches, Mixture

    rows = [{"prompt": f"Twice {i}? ", "completion": f"{2 * i}."} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sums.parquet")
    entries = [
        {"name": "jsonl", "paths": [str(folder / "examples.jsonl")], "weight": 3},
        {"name": "parquet", "paths": [str(tmp_path / "sums.parquet")], "weight": 1},
    ]
    tokenizer = Tokenizer(folder / "tok" / "tokenizer.json")
    mixture = prepare(config(folder, tmp_path, name="mix", paths=[], mix=entries, packing=packing), 320, tokenizer)
    assert isinstance(mixture, Mixture)
    alone = [prepare(config(folder, tmp_path, **{k: v for k, v in e.items() if k != "weight"}, packing=packing), 320, tokenizer)
             for e in entries]  # fmt: skip
    sampler = mixture.sampler(SEQ, seed=5)
    assert isinstance(sampler, MixedBatches)
    counts = [part.train.num_windows(SEQ) for part in alone]
    drawn = [sampler._window_of(g) for g in range(MixedBatches.BLOCK)]
    assert sum(w >= counts[0] for w in drawn) == MixedBatches.BLOCK // 4  # weights 3:1, exactly per block
    # A batch of the mixture holds each source's own rows: the same tensors its source alone gives.
    batch = mixture.train.batch(drawn[:16], SEQ)
    for row, window in enumerate(drawn[:16]):
        k, local = (0, window) if window < counts[0] else (1, window - counts[0])
        own = alone[k].train.batch([local], SEQ)
        assert own.keys() == batch.keys() and all(torch.equal(batch[key][row], own[key][0]) for key in own), row
    assert mixture.meta["examples"]["train"] == sum(part.meta["examples"]["train"] for part in alone)
    # End to end, with the examples counted over both sources in the log.
    mix = ", ".join(f"{{name: {e['name']}, paths: [{e['paths'][0]}], weight: {e['weight']}}}" for e in entries)
    data = ["data=mix", f"data.mix=[{mix}]", f"data.packing={packing}", f"data.seq_len={SEQ}"]
    data += [f"data.tokenizer={folder / 'tok'}", "model.vocab_size=320", "data.val_fraction=0.2"]
    result = fmtrain(["train", f"run_dir={tmp_path / 'run'}", *SMALL, *data, "trainer.max_steps=2"], cache_dir)
    assert result.returncode == 0, result.stderr
    total = sum(part.meta["examples"]["train"] + part.meta["examples"]["val"] for part in alone)
    assert f"data: {total} examples" in result.stderr + result.stdout
