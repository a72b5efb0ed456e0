"""Hugging Face's Llama-family layout (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``'s q/k/v biases, ``Qwen3ForCausalLM``'s per-head q/k norms) to and from fmtrain's
Llama state dict.

    adapter = models.get("llama").adapter(cfg.model)
    hf_state = adapter.to_external(model.state_dict())       # names and q/k layout transformers loads
    state = adapter.from_external(hf_state)                  # back, bit for bit
    adapter.external_config()                                # config.json for LlamaForCausalLM

Besides the names, one layout differs: fmtrain rotates interleaved pairs (x[2i], x[2i+1]) of each
query and key head (Meta's original layout), Hugging Face rotates halves (x[i], x[i + head_dim/2]).
The rows of ``wq`` and ``wk`` are permuted within each head (the permutation of transformers'
``convert_llama_weights_to_hf.py``; for ``wk`` over the key-value heads, which grouped-query
attention has fewer of), and so are the q/k biases and the entries of the per-head q/k norms, so
both models compute the same attention. A tied head is stored once,
as the embeddings, as ``save_pretrained`` does.
"""

from __future__ import annotations

import re

import torch

from fmtrain.config import ModelConfig

# fmtrain's name in a block -> Hugging Face's (both under the block's prefix)
BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",  # Qwen2
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def interleaved_to_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or the entries of its bias, of a per-head norm's weight): within each
    head, pairs (2i, 2i+1) -> (i, i + head_dim/2)."""
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = matrix.shape
    return matrix.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(weight.shape)


def halves_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_halves`."""
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = matrix.shape
    return matrix.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(weight.shape)


class LlamaHFAdapter:
    """fmtrain's Llama state dict <-> ``LlamaForCausalLM``'s, for the model config ``cfg``."""

    def __init__(self, cfg: ModelConfig, ffn_dim: int) -> None:
        self.cfg, self.ffn_dim = cfg, ffn_dim  # the SwiGLU hidden size (llama.ffn_hidden_dim)
        n_kv = cfg.n_kv_heads or cfg.n_heads
        # what is laid out by rotary pairs, and over how many heads
        self.heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": n_kv}
        self.heads |= {"attention.wq.bias": cfg.n_heads, "attention.wk.bias": n_kv}
        self.heads |= {"attention.q_norm.weight": 1, "attention.k_norm.weight": 1}  # one head's features

    def external_config(self) -> dict[str, object]:
        """``config.json`` for the family member (transformers 4.4x and 5.x read it alike)."""
        cfg = self.cfg
        architecture, model_type = self.architecture()
        rope: dict[str, object] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
        if cfg.rope_type == "llama3":
            rope |= {
                "factor": cfg.rope_factor,
                "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            }
        family = {"use_sliding_window": False, "sliding_window": None} if model_type != "llama" else {}  # unused keys
        return family | {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
            "head_dim": cfg.head_dim or cfg.dim // cfg.n_heads,
            "intermediate_size": self.ffn_dim,
            "hidden_act": "silu",
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,  # transformers 4.x
            "rope_scaling": rope if cfg.rope_type != "default" else None,  # 4.x
            "rope_parameters": rope,  # 5.x
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": cfg.init_std,
        }

    def architecture(self) -> tuple[str, str]:
        """The transformers class and model_type this config is: the family member with its features."""
        implied = "Qwen3ForCausalLM" if self.cfg.qk_norm else "Qwen2ForCausalLM" if self.cfg.qkv_bias else "LlamaForCausalLM"
        if implied == "LlamaForCausalLM" and self.cfg.hf_architecture == "MistralForCausalLM":
            implied = "MistralForCausalLM"  # Mistral without a sliding window computes what Llama does
        return implied, MODEL_TYPES[implied]

    def to_external(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in state.items():
            if name == "output.weight" and self.cfg.tie_embeddings:
                continue  # the embeddings, stored once
            if match := BLOCK.fullmatch(name):
                layer, rest = match.groups()
                if rest in self.heads:
                    tensor = interleaved_to_halves(tensor, self.heads[rest])
                out[f"model.layers.{layer}.{BLOCK_NAMES[rest]}"] = tensor
            else:
                out[TOP_NAMES[name]] = tensor
        return out

    def from_external(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        block_names = {hf: ours for ours, hf in BLOCK_NAMES.items()}
        top_names = {hf: ours for ours, hf in TOP_NAMES.items()}
        out, unknown = {}, []
        for name, tensor in state.items():
            match = HF_BLOCK.fullmatch(name)
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints store the rotary table; it is computed from the config
            if match and match.group(2) in block_names:
                layer, rest = match.groups()
                ours = block_names[rest]
                if ours in self.heads:
                    tensor = halves_to_interleaved(tensor, self.heads[ours])
                out[f"blocks.{layer}.{ours}"] = tensor
            elif name in top_names:
                out[top_names[name]] = tensor
            else:
                unknown.append(name)
        if unknown:
            raise ValueError(f"tensors LlamaForCausalLM does not have: {', '.join(sorted(unknown)[:5])}")
        if self.cfg.tie_embeddings and "tok_embeddings.weight" in out:  # (a part of the state: one file's)
            out["output.weight"] = out["tok_embeddings.weight"]
        return out
