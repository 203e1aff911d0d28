"""A tiny GPT-style language model (pre-norm transformer blocks), CPU-friendly."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class Block(nn.Module):
    """Causal self-attention and an MLP, each with a pre-norm residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class TinyGPT(nn.Module):
    """Character-level causal language model.

    Example:
        >>> model = TinyGPT(vocab_size=10, context=8, dim=16, layers=1, heads=2)
        >>> x = torch.zeros(2, 8, dtype=torch.long)
        >>> model(x).shape, round(model.loss(x, x).item(), 1) > 0
        (torch.Size([2, 8, 10]), True)
    """

    def __init__(
        self, vocab_size: int, *, context: int = 64, dim: int = 64, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.causal: torch.Tensor
        self.register_buffer(
            "causal",
            torch.triu(torch.ones(context, context, dtype=torch.bool), 1),
            persistent=False,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:n]
        mask = self.causal[:n, :n]
        for block in self.blocks:
            x = block(x, mask)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy."""
        logits = self(tokens)
        return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
