"""Transformer models that take any registered mixer, so every workload swaps methods by name."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from attention.config import MethodConfig
from attention.registry import build, build_feedforward


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x, mask=None):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + mixer(norm x), then x + ff(norm x). The method may bring its own ff."""

    def __init__(self, attn: MethodConfig, dim: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = build(attn, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = build_feedforward(attn, dim) or FeedForward(dim, ff_mult, dropout)

    def forward(self, x, mask=None, context=None, context_mask=None):
        kwargs = {} if context is None else {"context": context, "context_mask": context_mask}
        x = x + self.mixer(self.norm1(x), mask=mask, **kwargs)
        return x + self.ff(self.norm2(x), mask=mask)


class Transformer(nn.Module):
    def __init__(self, attn: MethodConfig, dim: int, depth: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(attn, dim, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, mask=None):
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x)


class DecoderLM(nn.Module):
    """Decoder-only language model: tokens (B, T) -> logits (B, T, vocab). The mixer is made causal."""

    def __init__(self, attn: MethodConfig, vocab: int, dim: int, depth: int, max_len: int,
                 ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        attn = dataclasses.replace(attn, causal=True)
        attn.check_seq_len(max_len)
        self.max_len = max_len
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.body = Transformer(attn, dim, depth, ff_mult, dropout)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_len {self.max_len}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        return self.head(self.body(x))


class Encoder(nn.Module):
    """Bidirectional encoder over embedded inputs (B, T, dim) with a key padding mask."""

    def __init__(self, attn: MethodConfig, dim: int, depth: int, max_len: int, ff_mult: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        attn.check_seq_len(max_len)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.body = Transformer(attn, dim, depth, ff_mult, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x + self.pos[: x.shape[1]], mask=mask)
