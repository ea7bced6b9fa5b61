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


class MultiheadMixer(nn.Module):
    """The frame of a multi-head attention mixer: project to (B, T, H, D) heads, `attend`, merge the
    heads, project back, zero the padded positions. Subclasses implement only `attend`."""

    cross = True  # whether `context` (cross attention) is accepted

    def __init__(self, cfg, dim: int):
        super().__init__()
        self.cfg = cfg
        heads, dim_head = cfg.inner_dim(dim)
        self.qkv = QKVProjection(dim, heads, dim_head)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.drop = nn.Dropout(cfg.dropout)

    def attend(self, q, k, v, *, causal: bool, key_mask):
        """(B, T, H, D) queries, (B, S, H, D) keys/values -> (B, T, H, D)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
        if context is not None and not self.cross:
            raise ValueError(f"{self.cfg.method}: cross attention is not supported (context was given); "
                             "use a method with cross attention, e.g. softmax")
        q, k, v = self.qkv(x, context)
        key_mask = mask if context is None else context_mask
        y = self.attend(q, k, v, causal=self.cfg.causal and context is None, key_mask=key_mask)
        return zero_padded(self.drop(self.to_out(merge_heads(y))), mask)
