"""model=custom model.target=...: a user's own nn.Module, built by a callable of theirs, trained by
every strategy. The module is the example users copy (examples/custom_model/tiny_gpt.py)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import fmtrain, train_losses

from fmtrain import models
from fmtrain.export import load_checkpoint_model, load_exported
from launch.compose import UsageError, compose

ROOT = Path(__file__).resolve().parents[1]
TARGET = "model.target=examples.custom_model.tiny_gpt.build"
OPTIONS = "++model.options={dim: 64, n_layers: 2, n_heads: 4}"
RUN = ["data.seq_len=64", "data.max_bytes=3000000", "trainer.global_batch_size=8", "trainer.eval_batches=2"]
RUN += ["trainer.plot=false", "trainer.eval_interval=3", "checkpoint.interval=3", "checkpoint.keep_last=5"]


@pytest.fixture(autouse=True)
def _repository_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # as the fmtrain command has its current directory


def test_the_builders_options_build_the_module_and_the_protocol_is_read() -> None:
    cfg = compose(["model=custom", TARGET, OPTIONS, "data.seq_len=64"])
    assert dict(cfg.model.options) == {"dim": 64, "n_layers": 2, "n_heads": 4}
    recipe = models.recipe(cfg)
    model = recipe.meta()
    assert len(recipe.blocks(model)) == 2 and type(model).__name__ == "TinyGPT"
    assert recipe.spec.tp_plan(model)["blocks.1.qkv"] == "colwise"
    params, flops = recipe.sizes(64)
    assert params == sum(p.numel() for p in model.parameters())
    assert flops == model.flops_per_token(64)
    model.to_empty(device="cpu")
    recipe.spec.init_weights(model, seed=3)
    again = recipe.meta()
    again.to_empty(device="cpu")
    recipe.spec.init_weights(again, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(64)) and model.blocks[0].qkv.weight.std() > 0.01
    assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)
    # the builder takes vocab_size and max_seq_len: model.* hands them over
    sized = models.recipe(
        compose(["model=custom", TARGET, OPTIONS, "model.vocab_size=300", "model.max_seq_len=96", "data.seq_len=64"])
    ).meta()
    assert (sized.tok.num_embeddings, sized.pos.num_embeddings) == (300, 96)


MODULE = """
from torch import nn

def no_blocks():
    return nn.Linear(4, 4)

def not_a_module():
    return 42

def fails(width=1):
    raise ValueError(f"width {width} is too small")

class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
"""

BAD = {
    # case: (overrides, what the one line says)
    "not importable": (["model.target=no_such_package.gpt.build"], "no_such_package.gpt cannot be imported"),
    "no module path": (["model.target=build"], "must be package.module.builder"),
    "no such callable": (["model.target=user_models.nothing"], "user_models has no callable nothing"),
    "no blocks": (["model.target=user_models.no_blocks"], "Linear needs .blocks, its repeated layers"),
    "not a module": (["model.target=user_models.not_a_module"], "returned a int, not an nn.Module"),
    "builder raises": (
        ["model.target=user_models.fails", "+model.options.width=2"],
        "user_models.fails(**model.options) failed: ValueError: width 2 is too small",
    ),
    "options without +": (
        [TARGET, "model.options.dim=64"],
        "model.options takes any key, added with a leading +: +model.options.dim=VALUE",
    ),
    "no target": ([], "model.target='' is invalid: required with model=custom"),
    "options contradict model.*": (
        [TARGET, "+model.options.max_seq_len=512"],
        "model.options.max_seq_len=512 is invalid: must equal model.max_seq_len=2048",
    ),
    "tp without a plan": (
        ["model.target=user_models.Plain", "strategy=tp", "launcher.nproc=2"],
        "strategy.name='tp' is invalid: model.arch=custom has no tensor-parallel plan",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_builder_that_cannot_build_is_refused_before_launch(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_models.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models", None)
    overrides, expected = BAD[case]
    with pytest.raises(UsageError) as error:
        compose(["model=custom", *overrides])
    message = str(error.value)
    assert expected in message and "\n" not in message, message


@pytest.mark.slow
def test_the_example_trains_under_ddp_fsdp_and_tp_alike_and_resumes_exactly(cache_dir: Path, tmp_path: Path) -> None:
    base = ["train", "model=custom", TARGET, OPTIONS, *RUN, "trainer.max_steps=9"]
    here = {"PYTHONPATH": str(ROOT)}  # where examples/ is, wherever the tests run from
    one = fmtrain([*base, f"run_dir={tmp_path / 'one'}"], cache_dir, **here)
    assert one.returncode == 0, one.stdout + one.stderr
    expected = train_losses(tmp_path / "one")
    assert expected.keys() == set(range(1, 10)) and expected[9] < expected[1] - 0.3
    for strategy in ("ddp", "fsdp", "tp"):
        args = [*base, f"run_dir={tmp_path / strategy}", f"strategy={strategy}", "launcher.nproc=2"]
        if strategy == "fsdp":  # killed after step 5: the same command resumes from step 3's checkpoint
            killed = fmtrain(args, cache_dir, FMTRAIN_FAULT="0:5:kill", **here)
            assert killed.returncode != 0
        result = fmtrain(args, cache_dir, **here)
        assert result.returncode == 0, result.stdout + result.stderr
        got = train_losses(tmp_path / strategy)
        assert got.keys() == expected.keys()
        for step, loss in expected.items():
            assert abs(got[step] - loss) <= 1e-5 * abs(loss), (strategy, step, got[step], loss)
    assert "resumed from" in (tmp_path / "fsdp" / "logs" / "rank0.log").read_text()

    export = fmtrain(["export", str(tmp_path / "fsdp"), "--format", "fmtrain"], cache_dir, **here)
    assert export.returncode == 0, export.stdout + export.stderr
    exported = load_exported(Path(export.stdout.strip()))
    checkpoint = load_checkpoint_model(
        tmp_path / "fsdp" / "checkpoints" / "step_000009", compose(["model=custom", TARGET, OPTIONS]).model
    )
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported.eval()(ids), checkpoint.eval()(ids))
