"""fp8: the conversion fmtrain applies on GPUs and 2-rank training with it, checked on CPU; refused on CPU before launch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, fmtrain, spawn_ranks, train_losses

from fmtrain.config import ConfigError, ModelConfig
from fmtrain.models.converters import Float8
from fmtrain.models.llama import LlamaSpec, Transformer
from fmtrain.validation import validate
from launch.compose import UsageError, compose


def test_fp8_converts_the_blocks_linear_layers_on_meta_and_keeps_the_seeded_init() -> None:
    """The real order: build on meta, convert, materialize, initialize from the seed."""
    from torchao.float8.float8_linear import Float8Linear

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(cfg)
    Float8().convert(model, LlamaSpec())
    model.to_empty(device="cpu")
    model.init_weights(0)
    converted = {name for name, module in model.named_modules() if isinstance(module, Float8Linear)}
    projections = (
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )
    assert converted == {f"blocks.{i}.{p}" for i in range(2) for p in projections}
    assert not isinstance(model.output, Float8Linear)  # the head stays bf16

    reference = Transformer(cfg)
    reference.init_weights(0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True))

    # torch runs fp8 matmuls (torch._scaled_mm) on this CPU too, slowly: enough to check the numbers.
    # e4m3 keeps 3 mantissa bits, so one forward's loss lands within 2% of bf16's.
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        expected = F.cross_entropy(reference(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=0.02)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fp8_is_refused_on_cpu_and_with_unsupported_strategies() -> None:
    with pytest.raises(UsageError, match=r"precision.name='fp8' is invalid: fp8 training needs GPUs .* device is cpu: .*bf16"):
        compose(["precision=fp8", "trainer.device=cpu"])
    with pytest.raises(UsageError, match=r"precision.name='fp8' is invalid: fp8 training needs GPUs .* this run has no GPU"):
        compose(["precision=fp8", "launcher=slurm"])  # a Slurm job without GPUs
    cfg = compose(["precision=fp8", "strategy=tp"], check=False)
    with pytest.raises(ConfigError, match=r"fp8 \(torchao Float8Linear\) is supported with strategy=ddp or fsdp"):
        validate(cfg, world_size=2)  # as for `fmtrain plan`: no device check
    validate(compose(["precision=fp8", "strategy=fsdp"], check=False), world_size=2)


def _fp8_rank(rank: int, overrides: list[str]) -> None:
    """One of 2 ranks of a real fmtrain run with precision=fp8, past the GPU check: torch runs the
    fp8 matmuls (torch._scaled_mm) on this CPU slowly, which is enough to check the composition."""
    import fmtrain.hardware
    from fmtrain.trainer import run

    fmtrain.hardware.check = lambda kind, strategy, precision, index=0: None  # type: ignore[assignment]  # the one thing faked
    run(compose(overrides, check=False))


@pytest.mark.slow
def test_fp8_training_under_fsdp_learns_like_bf16(cache_dir: Path, tmp_path: Path) -> None:
    """fp8 as a GPU would run it: Float8Linear converted on meta, then FSDP2 (bf16 parameters, fp32
    reduction), 2 ranks; only the device check is bypassed. (DDP's bf16 autocast over Float8Linear
    is the unit test above; measured to match bf16 as closely.) 10 steps: on this CPU an fp8 step
    takes ~2.4 s (70x bf16's)."""
    strategy = "fsdp"
    steps = ["trainer.max_steps=10", "trainer.eval_interval=10", "checkpoint.interval=10", "trainer.plot=false"]
    common = [*SMALL, *steps, f"strategy={strategy}", "launcher.nproc=2", "trainer.device=cpu"]
    bf16 = fmtrain(["train", f"run_dir={tmp_path / 'bf16'}", *common, "precision=bf16"], cache_dir)
    assert bf16.returncode == 0, bf16.stdout + bf16.stderr

    os.environ["FMTRAIN_CACHE"] = str(cache_dir)
    spawn_ranks(_fp8_rank, 2, [f"run_dir={tmp_path / 'fp8'}", *common, "precision=fp8"])

    fp8, reference = train_losses(tmp_path / "fp8"), train_losses(tmp_path / "bf16")
    assert sorted(fp8) == list(range(1, 11))
    assert fp8[10] < fp8[1] - 0.5, "fp8 training learns"
    # e4m3 keeps 3 mantissa bits to bf16's 8, with a scale per tensor: measured within 0.02% of bf16's
    # loss at every step (ddp and fsdp); 1% leaves a 50x margin and still fails if a scale goes wrong.
    for step, loss in reference.items():
        assert fp8[step] == pytest.approx(loss, rel=0.01), f"step {step}"
