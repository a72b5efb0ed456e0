"""fp8: the conversion fmtrain applies on GPUs, checked on CPU, and refused on CPU before launch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmtrain.config import ConfigError, ModelConfig, validate
from fmtrain.model import Transformer
from fmtrain.strategies import convert_to_fp8
from launch.compose import UsageError, compose


def test_fp8_converts_the_blocks_linear_layers_on_meta_and_keeps_the_seeded_init() -> None:
    """The real order: build on meta, convert, materialize, initialize from the seed."""
    from torchao.float8.float8_linear import Float8Linear

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(cfg)
    convert_to_fp8(model)
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
    with pytest.raises(UsageError, match=r"precision.name='fp8' is invalid: fp8 training needs GPUs .* this run has no GPU"):
        compose(["precision=fp8", "trainer.device=cpu"])
    cfg = compose(["precision=fp8", "strategy=tp"], check=False)
    with pytest.raises(ConfigError, match=r"fp8 \(torchao Float8Linear\) is supported with strategy=ddp or fsdp"):
        validate(cfg, world_size=2)  # as for `fmtrain plan`: no device check
    validate(compose(["precision=fp8", "strategy=fsdp"], check=False), world_size=2)
