"""The Llama spec's state-dict adapter against transformers' own ``LlamaForCausalLM``: the same
weights, mapped, give the same logits; the mapping goes there and back bit for bit."""

from __future__ import annotations

import pytest
import torch
import transformers

from fmtrain import models
from fmtrain.config import ModelConfig
from fmtrain.models.llama import ffn_hidden_dim

CASES = {
    "gqa-untied": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, tie_embeddings=False),
    "tied": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, tie_embeddings=True, rope_theta=500000.0),
    "mqa": ModelConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=1, vocab_size=128, norm_eps=1e-6, tie_embeddings=False),
}


def fmtrain_model(cfg: ModelConfig, seed: int = 7) -> torch.nn.Module:
    spec = models.get(cfg.arch)
    with torch.device("meta"):
        model = spec.build(cfg)
    model.to_empty(device="cpu")
    spec.init_weights(model, seed)
    return model.eval()


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=ffn_hidden_dim(cfg),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("case", CASES)
def test_the_mapped_weights_give_transformers_the_same_logits(case: str) -> None:
    cfg = CASES[case]
    ours = fmtrain_model(cfg)
    theirs = hf_model(cfg)
    adapter = models.get("llama").adapter(cfg)
    missing, unexpected = theirs.load_state_dict(adapter.to_external(ours.state_dict()), strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if cfg.tie_embeddings else []), (missing, unexpected)
    if cfg.tie_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
        got = theirs(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_there_and_back_is_bit_for_bit(case: str) -> None:
    cfg = CASES[case]
    adapter = models.get("llama").adapter(cfg)
    state = fmtrain_model(cfg).state_dict()
    theirs = hf_model(cfg)
    back = adapter.from_external(adapter.to_external(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    hf_state = {k: v for k, v in theirs.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    again = adapter.to_external(adapter.from_external(hf_state))
    assert again.keys() == hf_state.keys() and all(torch.equal(again[k], hf_state[k]) for k in hf_state)


def test_a_tensor_llama_does_not_have_is_named() -> None:
    adapter = models.get("llama").adapter(CASES["tied"])
    with pytest.raises(ValueError, match=r"tensors LlamaForCausalLM does not have: model.layers.0.mlp.fc1.weight"):
        adapter.from_external({"model.layers.0.mlp.fc1.weight": torch.ones(16)})


def test_a_model_without_an_adapter_says_so() -> None:
    assert models.ModelSpec().adapter(CASES["tied"]) is None
