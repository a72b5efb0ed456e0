"""fmtrain export: a sharded checkpoint becomes a Hugging Face model directory that transformers loads
as its own class, with the checkpoint's logits; verification.json says so."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FMTRAIN, SMALL, fmtrain

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

    sharded = subprocess.run(
        [FMTRAIN, "export", str(run_dir), "--max-shard-size", "100KB", "--out", str(tmp_path / "shards")],
        capture_output=True,
        text=True,
    )
    assert sharded.returncode == 0, sharded.stderr
    shards = sorted(p.name for p in (tmp_path / "shards").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    assert max((tmp_path / "shards" / name).stat().st_size for name in shards) < 100_000 + 70_000  # one tensor at most over
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shards", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens).logits, theirs(input_ids=tokens).logits)

    own = subprocess.run([FMTRAIN, "export", str(run_dir), "--format", "fmtrain", "--out", str(tmp_path / "own")], text=True)
    assert own.returncode == 0
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "own")(tokens), trained(tokens))

    half = subprocess.run(
        [FMTRAIN, "export", str(run_dir), "--dtype", "bf16", "--out", str(tmp_path / "bf16")], capture_output=True, text=True
    )
    assert half.returncode == 0, half.stderr
    bf16 = load_exported(tmp_path / "bf16")
    with torch.no_grad():
        torch.testing.assert_close(bf16(tokens), trained(tokens), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_export_names_a_missing_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = fmtrain(["train", f"run_dir={run_dir}", *SMALL, "trainer.max_steps=2"], cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    missing = fmtrain(["export", str(run_dir), "--step", "7"], cache_dir)
    assert missing.returncode == 2
    assert f"{run_dir}/checkpoints/step_000007: no such checkpoint" in missing.stderr


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
