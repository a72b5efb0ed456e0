"""A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query causal attention.

A plain ``nn.Module`` that never imports ``torch.distributed``: strategies wrap it, and it exposes
what they need (``blocks`` to shard or checkpoint, ``flops_per_token`` for MFU).

    with torch.device("meta"):
        model = Transformer(ModelConfig())
    model.to_empty(device="cpu")
    model.init_weights(seed=1337)          # deterministic from the seed, whatever the device
    logits = model(tokens)                 # (batch, seq) int64 -> (batch, seq, vocab)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fmtrain.config import ModelConfig


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """Llama's rule: 2/3 of 4*dim, scaled, rounded up to a multiple of ``multiple_of``."""
    hidden = int(cfg.ffn_dim_multiplier * int(2 * 4 * cfg.dim / 3))
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_tables(head_dim: int, seq_len: int, theta: float, device: torch.device) -> torch.Tensor:
    """cos and sin of the rotary angles, shape (2, seq_len, head_dim // 2), in fp32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x: (batch, heads, seq, head_dim)."""
    cos, sin = rope[0, : x.shape[-2]], rope[1, : x.shape[-2]]
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
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

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
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
        # Blocks whose activations are recomputed in backward instead of kept (a strategy sets it).
        self.checkpointed: frozenset[int] = frozenset()
        # Not persistent: derived from the config, so checkpoints hold only learned state.
        self.rope: torch.Tensor
        self.register_buffer("rope", torch.empty(2, cfg.max_seq_len, cfg.dim // cfg.n_heads // 2), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for index, block in enumerate(self.blocks):
            if index in self.checkpointed and torch.is_grad_enabled():
                h = checkpoint(block, h, self.rope, use_reentrant=False)
            else:
                h = block(h, self.rope)
        return self.output(self.norm(h))

    @torch.no_grad()
    def init_buffers(self) -> None:
        """After ``to_empty()``: tie the head to the embeddings again and compute the rotary table.

        Enough before loading a state dict; :meth:`init_weights` does this and draws the weights.
        """
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight  # to_empty() untied plain tensors
        head_dim = self.cfg.dim // self.cfg.n_heads
        self.rope.copy_(rotary_tables(head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope.device))

    @torch.no_grad()
    def init_weights(
        self,
        seed: int,
        assign: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    ) -> None:
        """Initialize every parameter from ``seed`` alone, in a fixed order, on the model's device.

        Values are drawn on the CPU for the whole (unsharded) parameter, so a model sharded by a
        strategy starts exactly where a single process does: ``assign(param, full_value)`` copies
        the part a rank holds (the default copies all of it). ``parameters`` replaces
        ``named_parameters()`` (same names, same order) where a strategy must make each parameter
        whole while it is written (ZeRO-3 gathers one at a time).

        Residual output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2's rule) so that the
        residual stream's variance does not grow with depth.
        """
        self.init_buffers()
        if assign is None:

            def assign(param: torch.Tensor, value: torch.Tensor) -> None:
                param.copy_(value)

        generator = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        for name, param in self.named_parameters() if parameters is None else parameters:
            if name.endswith("norm.weight"):
                assign(param, torch.ones(param.shape))
                continue
            scale = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, scale, generator=generator)
            assign(param, values.clamp_(-3 * scale, 3 * scale))

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
