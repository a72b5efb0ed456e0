"""A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query causal attention.

A plain ``nn.Module`` that never imports ``torch.distributed``; :class:`LlamaSpec` (``model.arch=llama``,
the default) tells strategies what they need: the blocks to shard or checkpoint, the seeded init,
the tensor- and sequence-parallel plans, FLOPs per token.

    with torch.device("meta"):
        model = Transformer(ModelConfig())
    model.to_empty(device="cpu")
    model.init_weights(seed=1337)          # deterministic from the seed, whatever the device
    logits = model(tokens)                 # (batch, seq) int64 -> (batch, seq, vocab)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fmtrain.config import ConfigError, ModelConfig
from fmtrain.models.llama_hf import LlamaHFAdapter
from fmtrain.models.spec import Assign, ModelSpec, copy_value, draw_weights, truncated_normal


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """``ffn_dim`` when set (a Hugging Face config's ``intermediate_size``); else Llama's rule: 2/3 of
    4*dim, scaled, rounded up to a multiple of ``multiple_of``."""
    if cfg.ffn_dim is not None:
        return cfg.ffn_dim
    hidden = int(cfg.ffn_dim_multiplier * int(2 * 4 * cfg.dim / 3))
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's fused ``rms_norm`` (statistics in fp32 whatever ``x`` holds). Under autocast the
        result is cast once to the compute dtype here, instead of once by each projection reading it
        (Q, K and V; the two SwiGLU inputs): the same values, fewer copies."""
        out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            out = out.to(torch.get_autocast_dtype(device))
        return out

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def head_dim_of(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.dim // cfg.n_heads


def rotary_frequencies(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """The rotary frequency of each pair of a head, in fp32: theta's, rescaled for ``rope_type=llama3``
    (long wavelengths divided by ``rope_factor``, a smooth blend in between: Llama 3.1's rule, as
    transformers' ``_compute_llama3_parameters``)."""
    head_dim = head_dim_of(cfg)
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if cfg.rope_type == "default":
        return freqs
    context, factor = cfg.rope_original_max_seq_len, cfg.rope_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / freqs
    scaled = torch.where(wavelength > context / low, freqs / factor, freqs)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, blended, scaled)


def rotary_tables(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """cos and sin of the rotary angles, shape (max_seq_len, head_dim // 2, 2), in fp32: the unit
    complex number of each position and pair, as :func:`apply_rotary` views it."""
    freqs = rotary_frequencies(cfg, device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x: (batch, seq, heads, head_dim) by the angles of
    ``rope``, the table's rows of x's positions ((seq, ...) or, per sequence, (batch, seq, ...)), by one complex
    product per pair in fp32 (Meta's and torchtitan's form: one kernel each way, where the rotation
    written out in real arithmetic takes four products, two sums and a copy). Under torch.compile the
    real form, which inductor fuses into one kernel (it generates no code for complex numbers)."""
    table = rope.float().unsqueeze(-3)  # (seq, 1, head_dim // 2, 2), or (batch, seq, 1, ...) for position ids
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        cos, sin, real, imag = table[..., 0], table[..., 1], pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(table))
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = head_dim_of(cfg)
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        # Qwen3: each head's queries and keys normalized (over head_dim) before the rotation
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope).transpose(1, 2), apply_rotary(k, rope).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # (batch, 1, seq, seq): causal within each packed example
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.attention_norm(x)
        # the mask only when there is one: tensor parallelism's input plans count the module's inputs
        x = x + (self.attention(normed, rope) if mask is None else self.attention(normed, rope, mask))
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: derived from the config, so checkpoints hold only learned state.
        self.rope: torch.Tensor
        self.register_buffer("rope", torch.empty(cfg.max_seq_len, head_dim_of(cfg) // 2, 2), persistent=False)

    def forward(
        self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of ``tokens`` (batch, seq). Several examples packed in a row: ``position_ids`` restart
        at each (the rotary angles follow them) and ``document_ids`` keep attention within each."""
        h = self.tok_embeddings(tokens)
        rope = self.rope[: tokens.shape[1]] if position_ids is None else self.rope[position_ids]
        mask = None
        if document_ids is not None:
            causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device).tril()
            mask = ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]
        for block in self.blocks:
            h = block(h, rope) if mask is None else block(h, rope, mask)
        return self.output(self.norm(h))

    @torch.no_grad()
    def init_buffers(self) -> None:
        """After ``to_empty()``: tie the head to the embeddings again and compute the rotary table.

        Enough before loading a state dict; :meth:`init_weights` does this and draws the weights.
        """
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight  # to_empty() untied plain tensors
        self.rope.copy_(rotary_tables(self.cfg, self.rope.device))

    @torch.no_grad()
    def init_weights(
        self, seed: int, assign: Assign = copy_value, parameters: Iterable[tuple[str, nn.Parameter]] | None = None
    ) -> None:
        """Initialize every parameter from ``seed`` alone, in a fixed order (:func:`draw_weights`).

        Values are drawn on the CPU for the whole (unsharded) parameter, so a model sharded by a
        strategy starts exactly where a single process does: ``assign(param, full_value)`` copies
        the part a rank holds (the default copies all of it). ``parameters`` replaces
        ``named_parameters()`` (same names, same order) where a strategy must make each parameter
        whole while it is written (ZeRO-3 gathers one at a time).

        Residual output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2's rule) so that the
        residual stream's variance does not grow with depth.
        """
        self.init_buffers()
        std = self.cfg.init_std

        def value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
            if name.endswith("norm.weight"):
                return torch.ones(shape)
            if name.endswith(".bias"):
                return torch.zeros(shape)
            scaled = name.endswith(("wo.weight", "w2.weight"))
            return truncated_normal(shape, std / math.sqrt(2 * self.cfg.n_layers) if scaled else std, generator)

        draw_weights(self.named_parameters() if parameters is None else parameters, seed, assign, value)

    def tp_plan(self) -> dict[str, str]:
        """How tensor parallelism splits each block: module path pattern -> "colwise" | "rowwise".

        Q/K/V and the SwiGLU input projections split their outputs (heads, hidden units); the
        output projections split their inputs and sum, so each block's output is whole again.
        Embeddings, norms and the output head stay replicated.
        """
        plan = {"attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise", "attention.wo": "rowwise"}
        plan |= {"feed_forward.w1": "colwise", "feed_forward.w3": "colwise", "feed_forward.w2": "rowwise"}
        return {f"blocks.{i}.{path}": style for i in range(self.cfg.n_layers) for path, style in plan.items()}

    def sequence_parallel_plan(self) -> dict[str, str]:
        """With sequence parallelism, on top of :meth:`tp_plan`: between the projections the residual
        stream is split along the sequence, and the row-parallel projections reduce-scatter into
        that split instead of all-reducing.

        "split": the module's input is split along the sequence (the first block's, coming from the
        replicated embeddings); "norm": runs on each rank's part of the sequence; "gather": the
        module's input is gathered whole before it runs (attention, feed-forward, the head).
        """
        plan = {"blocks.0": "split", "norm": "norm", "output": "gather"}
        for i in range(self.cfg.n_layers):
            plan |= {f"blocks.{i}.attention_norm": "norm", f"blocks.{i}.attention": "gather"}
            plan |= {f"blocks.{i}.ffn_norm": "norm", f"blocks.{i}.feed_forward": "gather"}
        return plan

    def num_params(self, *, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.tok_embeddings.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + 12 x layers x dim x seq (attention).

        The embedding lookup is no matmul; the output projection is, tied or not (PaLM, app. B).
        """
        matmul_params = self.num_params(embeddings=False)
        if self.cfg.tie_embeddings:
            matmul_params += self.cfg.vocab_size * self.cfg.dim
        return 6.0 * matmul_params + 12.0 * self.cfg.n_layers * self.cfg.dim * seq_len


class LlamaSpec(ModelSpec):
    """``model.arch=llama``: :class:`Transformer`, with Megatron-style tensor and sequence parallelism."""

    name = "llama"
    compiles = True  # tests/test_strategies.py: test_compiled_blocks_train_like_eager
    packed_inputs = True

    def build(self, cfg: ModelConfig) -> nn.Module:
        return Transformer(cfg)

    def adapter(self, cfg: ModelConfig) -> LlamaHFAdapter:
        """Hugging Face's Llama layout (:mod:`fmtrain.models.llama_hf`): Llama, Mistral, Qwen2, Qwen3."""
        return LlamaHFAdapter(cfg, ffn_hidden_dim(cfg))

    def check(self, cfg: ModelConfig) -> None:
        if head_dim_of(cfg) % 2:
            field, value = ("model.head_dim", cfg.head_dim) if cfg.head_dim else ("model.n_heads", cfg.n_heads)
            raise ConfigError(field, value, "the head dim (model.head_dim, else dim/n_heads) must be even for rotary embeddings")
        n_kv = cfg.n_kv_heads or cfg.n_heads
        if n_kv <= 0 or cfg.n_heads % n_kv:
            raise ConfigError("model.n_kv_heads", cfg.n_kv_heads, f"must be positive and divide model.n_heads={cfg.n_heads}")

    def init_weights(
        self,
        model: nn.Module,
        seed: int,
        assign: Assign = copy_value,
        parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    ) -> None:
        assert isinstance(model, Transformer)
        model.init_weights(seed, assign, parameters)

    def init_buffers(self, model: nn.Module) -> None:
        assert isinstance(model, Transformer)
        model.init_buffers()

    def tp_plan(self, model: nn.Module) -> dict[str, str]:
        assert isinstance(model, Transformer)
        return model.tp_plan()

    def sequence_parallel_plan(self, model: nn.Module) -> dict[str, str]:
        assert isinstance(model, Transformer)
        return model.sequence_parallel_plan()

    def tp_divides(self, cfg: ModelConfig) -> list[tuple[str, int]]:
        return [
            ("model.n_heads", cfg.n_heads),
            ("model.n_kv_heads", cfg.n_kv_heads or cfg.n_heads),
            ("the SwiGLU hidden size", ffn_hidden_dim(cfg)),
        ]

    def flops_per_token(self, model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
        assert isinstance(model, Transformer)
        return model.flops_per_token(seq_len)

    def export_config(self, cfg: ModelConfig) -> dict[str, object]:
        return {
            "architectures": ["FmtrainTransformer"],
            "model_type": "llama",
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
            "intermediate_size": ffn_hidden_dim(cfg),
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
