"""fmtrain export: a sharded checkpoint becomes a Hugging Face model directory that transformers loads
as its own class, with the checkpoint's logits; verification.json says so."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SMALL, fmtrain, one_line_error

from fmtrain import models
from fmtrain.config import load
from fmtrain.export import load_checkpoint_model, load_exported


@pytest.mark.slow
def test_an_fsdp_checkpoint_exports_to_a_plain_model_with_equal_logits(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = fmtrain(
        ["train", f"run_dir={run_dir}", *SMALL, "trainer.max_steps=6", "strategy=fsdp", "launcher.nproc=2"], cache_dir
    )
    assert result.returncode == 0, result.stdout + result.stderr

    exported = fmtrain(["export", str(run_dir)], cache_dir, timeout=120)
    assert exported.returncode == 0, exported.stderr
    out = Path(exported.stdout.strip())
    assert out == run_dir / "export" / "step_000006"
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["tie_word_embeddings"]) == (64, 2, True)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    verification = json.loads((out / "verification.json").read_text())
    assert verification["loader"].startswith("transformers ") and verification["max_abs_logit_diff"] < 1e-5, verification

    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    trained = load_checkpoint_model(run_dir / "checkpoints" / "step_000006", load(run_dir / "config.yaml").model)
    plain = load_exported(out)
    with torch.no_grad():
        assert torch.equal(plain(tokens), trained(tokens))
    initial = load_checkpoint_model(run_dir / "checkpoints" / "step_000006", load(run_dir / "config.yaml").model)
    initial.init_weights(load(run_dir / "config.yaml").seed)
    assert not torch.equal(plain.tok_embeddings.weight, initial.tok_embeddings.weight), "trained weights, not the init"

    # transformers itself: its own class, every tensor used, the checkpoint's logits, the run's tokenizer.
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert (theirs(input_ids=tokens).logits - trained(tokens)).abs().max().item() < 1e-5
    text = "def f(x):\n    return x ** 2  # ∑ é"
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == list(text.encode())
    # Hugging Face -> fmtrain -> Hugging Face: the same tensors, bit for bit.
    from fmtrain.export import read_tensors

    again = models.get("llama").adapter(plain_cfg := load(run_dir / "config.yaml").model)
    assert plain_cfg.tie_embeddings
    written = read_tensors(out)
    back = again.to_external(again.from_external(written))
    assert back.keys() == written.keys() and all(torch.equal(back[k], written[k]) for k in written)

    sharded = fmtrain(["export", str(run_dir), "--max-shard-size", "100KB", "--out", str(tmp_path / "shards")], cache_dir)
    assert sharded.returncode == 0, sharded.stderr
    shards = sorted(p.name for p in (tmp_path / "shards").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    assert max((tmp_path / "shards" / name).stat().st_size for name in shards) < 100_000 + 70_000  # one tensor at most over
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shards", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens).logits, theirs(input_ids=tokens).logits)

    own = fmtrain(["export", str(run_dir), "--format", "fmtrain", "--out", str(tmp_path / "own")], cache_dir)
    assert own.returncode == 0, own.stderr
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "own")(tokens), trained(tokens))

    half = fmtrain(["export", str(run_dir), "--dtype", "bf16", "--out", str(tmp_path / "bf16")], cache_dir)
    assert half.returncode == 0, half.stderr
    bf16 = load_exported(tmp_path / "bf16")
    with torch.no_grad():
        torch.testing.assert_close(bf16(tokens), trained(tokens), rtol=0.05, atol=0.05)


def checksums(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*") if f.is_file()}


@pytest.mark.slow
def test_export_never_deletes_or_overwrites_what_it_did_not_write(tmp_path: Path, cache_dir: Path, tmpfs) -> None:
    """Issue 30 #1: ``--out`` was emptied with ``shutil.rmtree`` before writing: pointed at the run directory
    it deleted the run's checkpoints, pointed at a user's folder it deleted their files and exited 0."""
    run_dir = tmp_path / "runs" / "run"
    result = fmtrain(["train", f"run_dir={run_dir}", *SMALL, "trainer.max_steps=2"], cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    before = checksums(tmp_path)

    def refused(*args: str) -> str:
        return one_line_error(fmtrain(["export", str(run_dir), *args], cache_dir))

    assert f"{run_dir}/checkpoints/step_000007: no such checkpoint" in refused("--step", "7")
    for out in (run_dir, tmp_path / "runs", tmp_path):
        assert f"--out {out} is the run directory or holds it" in refused("--out", str(out))
    assert "is inside the run's checkpoints" in refused("--out", str(run_dir / "checkpoints" / "step_000002"))
    assert f"--out {mine} holds files fmtrain did not write (notes.txt)" in refused("--out", str(mine))
    assert "is a file, not a folder" in refused("--out", str(mine / "notes.txt"))
    read_only = tmpfs.mount(8)
    tmpfs.remount("ro")  # chmod would not stop root
    assert f"--out {read_only / 'model'}: cannot write in {read_only}: Read-only file system" in refused(
        "--out", str(read_only / "model")
    )
    assert checksums(tmp_path) == before, "a refused export changed files"

    # An earlier export is replaced, its files only: none of its shards is left beside the new file, and a file
    # the user put there is kept.
    out = tmp_path / "export"
    sharded = fmtrain(["export", str(run_dir), "--out", str(out), "--max-shard-size", "100KB"], cache_dir)
    assert sharded.returncode == 0, sharded.stderr
    assert len(list(out.glob("model-*.safetensors"))) > 2
    (out / "README.md").write_text("my model card")
    again = fmtrain(["export", str(run_dir), "--out", str(out)], cache_dir)
    assert again.returncode == 0, again.stderr
    record = json.loads((out / "fmtrain-export.json").read_text())["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*record, "fmtrain-export.json", "README.md"])
    assert "model.safetensors" in record and not list(out.glob("model-*")) and (out / "README.md").read_text() == "my model card"
    verification = json.loads((out / "verification.json").read_text())
    assert verification["passed"] is True and verification["tolerance"] == 1e-4 > verification["max_abs_logit_diff"]
    assert checksums(tmp_path / "runs") == {k.removeprefix("runs/"): v for k, v in before.items() if k.startswith("runs/")}


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1000", 1000), ("1.5kb", 1500)]
)
def test_shard_sizes_parse(text: str, size: int) -> None:
    from fmtrain.export import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-5GB", "5XB", "GB", "nan"])
def test_a_bad_shard_size_is_named(text: str) -> None:
    from fmtrain.export import parse_size

    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)
