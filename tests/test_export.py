"""fmtrain export: a sharded checkpoint becomes one safetensors file that a plain process loads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FMTRAIN, SMALL, fmtrain

from fmtrain.config import load
from fmtrain.export import load_checkpoint_model, load_exported

pytestmark = pytest.mark.slow


def test_an_fsdp_checkpoint_exports_to_a_plain_model_with_equal_logits(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = fmtrain(
        ["train", f"run_dir={run_dir}", *SMALL, "trainer.max_steps=6", "strategy=fsdp", "launcher.nproc=2"], cache_dir
    )
    assert result.returncode == 0, result.stdout + result.stderr

    exported = subprocess.run([FMTRAIN, "export", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    out = Path(exported.stdout.strip())
    assert out == run_dir / "export" / "step_000006"
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["tie_word_embeddings"]) == (64, 2, True)

    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    trained = load_checkpoint_model(run_dir / "checkpoints" / "step_000006", load(run_dir / "config.yaml").model)
    plain = load_exported(out)
    with torch.no_grad():
        assert torch.equal(plain(tokens), trained(tokens))
    initial = load_checkpoint_model(run_dir / "checkpoints" / "step_000006", load(run_dir / "config.yaml").model)
    initial.init_weights(load(run_dir / "config.yaml").seed)
    assert not torch.equal(plain.tok_embeddings.weight, initial.tok_embeddings.weight), "trained weights, not the init"

    half = subprocess.run(
        [FMTRAIN, "export", str(run_dir), "--dtype", "bf16", "--out", str(tmp_path / "bf16")], capture_output=True, text=True
    )
    assert half.returncode == 0, half.stderr
    bf16 = load_exported(tmp_path / "bf16")
    with torch.no_grad():
        torch.testing.assert_close(bf16(tokens), trained(tokens), rtol=0.05, atol=0.05)


def test_export_names_a_missing_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = fmtrain(["train", f"run_dir={run_dir}", *SMALL, "trainer.max_steps=2"], cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    missing = subprocess.run([FMTRAIN, "export", str(run_dir), "--step", "7"], capture_output=True, text=True)
    assert missing.returncode == 2
    assert f"{run_dir}/checkpoints/step_000007: no such checkpoint" in missing.stderr
