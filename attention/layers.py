"""Small parts the mixers share: head projections and reshapes."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, T, H, D), the ops' layout."""
    return rearrange(x, "b t (h d) -> b t h d", h=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) -> (B, T, H*D)."""
    return rearrange(x, "b t h d -> b t (h d)")


class QKVProjection(nn.Module):
    """x -> q, k, v as (B, T, H, D); k, v come from `context` when given (cross attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int, bias: bool = False):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        src = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(src).chunk(2, dim=-1))
        return q, k, v


def zero_padded(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the outputs at padded positions (mask False) so they carry nothing downstream."""
    return y if mask is None else y * mask[..., None].to(y.dtype)
