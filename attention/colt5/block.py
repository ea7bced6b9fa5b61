"""The full CoLT5 layer: routed attention and routed feed-forward, each pre-normed with a residual."""

from __future__ import annotations

import torch
from torch import nn

from attention.colt5.config import Colt5Config
from attention.colt5.feedforward import FeedForwardBranch, routed_feedforward
from attention.colt5.mixer import colt5_mixer


class Colt5Block(nn.Module):
    """x + attn(norm x), then x + ff(norm x). The attention is the variant cfg selects (bidirectional,
    autoregressive when causal, cross with context when cross_attention); the feed-forward is routed
    when cfg.route_ff, else a dense one of width heavy_ff_mult."""

    def __init__(self, cfg: Colt5Config, dim: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = colt5_mixer(cfg, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = routed_feedforward(cfg, dim) or FeedForwardBranch(dim, cfg.heavy_ff_mult, cfg.dropout)
        self.routed_ff = cfg.route_ff

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, context=context, context_mask=context_mask)
        normed = self.ff_norm(x)
        return x + (self.ff(normed, mask=mask) if self.routed_ff else self.ff(normed))

    @property
    def aux(self) -> dict[str, torch.Tensor]:
        return {**getattr(self.attn, "aux", {}), **getattr(self.ff, "aux", {})}
