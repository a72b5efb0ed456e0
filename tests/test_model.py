"""The model: causal, deterministic from the seed, FLOPs by hand."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from fmtrain.config import ModelConfig
from fmtrain.models.llama import Transformer, ffn_hidden_dim
from fmtrain.strategies import checkpoint_block

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def build(cfg: ModelConfig = CFG, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def test_initialisation_depends_on_the_seed_alone() -> None:
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_attention_is_causal() -> None:
    model = build()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (2, 16, 256)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_tied_embeddings_share_one_tensor() -> None:
    model = build()
    assert model.output.weight is model.tok_embeddings.weight
    untied = build(dataclasses.replace(CFG, tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() == model.num_params() + 256 * 64


def test_flops_per_token_by_hand() -> None:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=32)
    hidden = ffn_hidden_dim(cfg)
    per_layer = 4 * 64 * 64 + 3 * 64 * hidden + 2 * 64  # attention, SwiGLU, two norms
    matmul_params = 2 * per_layer + 64 + 256 * 64  # + final norm + output projection (tied)
    assert build(cfg).flops_per_token(seq_len=32) == pytest.approx(6 * matmul_params + 12 * 2 * 64 * 32)


def test_a_few_steps_learn_a_repeated_sequence() -> None:
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.arange(17).repeat(4, 1)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_checkpointed_blocks_recompute_in_backward_and_give_the_same_gradients() -> None:
    grads = {}
    for checkpointed in (frozenset(), frozenset({0})):
        model = build()
        calls = [0, 0]

        def counted(forward, index, calls=calls):
            def wrapper(*args):
                calls[index] += 1
                return forward(*args)

            return wrapper

        for index, block in enumerate(model.blocks):
            block.forward = counted(block.forward, index)
        for index in checkpointed:
            checkpoint_block(model.blocks[index])
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        model(tokens).sum().backward()
        assert calls == ([1, 1] if not checkpointed else [2, 1])  # block 0 ran again in backward
        grads[checkpointed] = [p.grad.clone() for p in model.parameters()]
    for plain, recomputed in zip(*grads.values(), strict=True):
        assert torch.equal(plain, recomputed)


@pytest.mark.parametrize(("mode", "expected"), [("none", set()), ("full", {0, 1, 2, 3, 4}), ("every_n", {0, 2, 4})])
def test_activation_checkpointing_modes_choose_their_blocks(mode: str, expected: set[int]) -> None:
    from fmtrain.config import TrainerConfig
    from fmtrain.strategies import checkpointed_blocks, prepare_blocks

    model = build(dataclasses.replace(CFG, n_layers=5))
    prepare_blocks(model.blocks, TrainerConfig(activation_checkpointing=mode, checkpoint_every_n=2))
    assert checkpointed_blocks(model.blocks) == expected


def test_a_meta_build_has_every_shape_and_loads_no_python_meta_kernels() -> None:
    """meta_device() skips the initializers' fills (values a meta tensor does not hold): the same
    parameters as under torch.device("meta"), without loading torch's Python meta kernels (and sympy),
    which the first ``normal_`` on meta does (1.5 s in the CLI, sizing a model before launch)."""
    code = """
import sys, torch
from fmtrain.config import ModelConfig
from fmtrain.models.llama import Transformer
from fmtrain.models.spec import meta_device
with meta_device():
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, qk_norm=True))
    trunc = torch.nn.init.trunc_normal_(torch.empty(4, 4))
print(sorted(m for m in ("sympy", "mpmath") if m in sys.modules))
print([(n, tuple(p.shape), str(p.dtype), p.is_meta) for n, p in model.named_parameters()], trunc.is_meta)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]", out[0]
    with torch.device("meta"):
        plain = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, qk_norm=True))
    assert out[1] == str([(n, tuple(p.shape), str(p.dtype), True) for n, p in plain.named_parameters()]) + " True"
