"""A GPT of your own, trained by fmtrain without a spec: copy this file and change the model.

    fmtrain train model=custom model.target=examples.custom_model.tiny_gpt.build \
        'model.options={dim: 128, n_layers: 4, n_heads: 4}' strategy=fsdp launcher.nproc=2

(from the repository's root; elsewhere, put the file's folder on PYTHONPATH and name it
``model.target=tiny_gpt.build``). fmtrain calls ``build(**model.options)`` on the meta device, with
``vocab_size`` and ``max_seq_len`` from ``model.vocab_size`` and ``model.max_seq_len``, and
asks the module only for what ``fmtrain/models/custom.py`` lists: ``blocks`` (required), and here
also ``init_value``, ``tp_plan`` and ``flops_per_token``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm attention and a GELU MLP, each around the residual stream."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # (batch, seq, heads, 3 * head_dim): each head's q, k, v together, so that tensor
        # parallelism's column split of qkv gives each rank whole heads
        q, k, v = self.qkv(self.ln_1(x)).view(batch, seq, -1, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, -1))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))

    @property
    def head_dim(self) -> int:
        return self.proj.in_features // self.n_heads


class TinyGPT(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, max_seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.n_layers, self.dim = n_layers, dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def init_value(self, name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 x layers); LayerNorms 1, biases 0."""
        if name.endswith("bias"):
            return torch.zeros(shape)
        if len(shape) == 1:
            return torch.ones(shape)
        std = 0.02 / math.sqrt(2 * self.n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    def tp_plan(self) -> dict[str, str]:
        """Megatron's split: qkv and fc by columns (heads, hidden units), proj and out by rows."""
        plan = {}
        for i in range(len(self.blocks)):
            plan |= {f"blocks.{i}.qkv": "colwise", f"blocks.{i}.proj": "rowwise"}
            plan |= {f"blocks.{i}.fc": "colwise", f"blocks.{i}.out": "rowwise"}
        return plan

    def flops_per_token(self, seq_len: int) -> float:
        matrices = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * matrices + 12.0 * self.n_layers * self.dim * seq_len


def build(vocab_size: int = 256, dim: int = 128, n_layers: int = 4, n_heads: int = 4, max_seq_len: int = 1024) -> TinyGPT:
    if dim % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide dim={dim}")
    return TinyGPT(vocab_size, dim, n_layers, n_heads, max_seq_len)
