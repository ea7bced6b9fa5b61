"""CoLT5 routed image attention: light attention inside small 2D windows of the feature map plus routed
heavy attention inside large windows (or over the whole map), channel first or channel last."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attention.colt5.config import Colt5Config
from attention.colt5.routed import RoutedHeavyAttention
from attention.layers import QKVProjection, merge_heads


def _windows(x: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, H, W, C) -> windows (B * nh * nw, side * side, C) and their validity mask (same, bool).

    The map is padded up to whole windows; padded positions are masked, never attended to."""
    b, h, w, _ = x.shape
    ph, pw = -h % side, -w % side
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    valid = F.pad(torch.ones(b, h, w, dtype=torch.bool, device=x.device), (0, pw, 0, ph), value=False)
    pattern = "b (nh sh) (nw sw) ... -> (b nh nw) (sh sw) ..."
    return rearrange(x, pattern, sh=side, sw=side), rearrange(valid, pattern, sh=side, sw=side)


def _unwindow(x: torch.Tensor, b: int, h: int, w: int, side: int) -> torch.Tensor:
    """Inverse of _windows: (B * nh * nw, side * side, C) -> (B, H, W, C), padding cut off."""
    nh, nw = -(-h // side), -(-w // side)
    x = rearrange(x, "(b nh nw) (sh sw) c -> b (nh sh) (nw sw) c", b=b, nh=nh, nw=nw, sh=side, sw=side)
    return x[:, :h, :w]


class WindowAttention(nn.Module):
    """Full attention inside non-overlapping side x side windows (the light branch)."""

    def __init__(self, dim: int, heads: int, dim_head: int, side: int):
        super().__init__()
        self.side = side
        self.qkv = QKVProjection(dim, heads, dim_head)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        tokens, valid = _windows(x, self.side)  # (B', S, C), (B', S)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(tokens))  # (B', heads, S, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return _unwindow(self.to_out(merge_heads(out.transpose(1, 2))), b, h, w, self.side)


class RoutedImageAttention(nn.Module):
    """(B, C, H, W) when channel_first else (B, H, W, C) -> same shape.

    light_window: side of the light attention windows. heavy_window: side of the windows the heavy
    branch routes within (0 = the whole map); cfg.num_routed_q / num_routed_kv are per heavy window.
    Router and head knobs come from cfg (a non-causal Colt5Config)."""

    def __init__(self, dim: int, cfg: Colt5Config, *, light_window: int = 8, heavy_window: int = 0,
                 channel_first: bool = False):
        super().__init__()
        if cfg.causal:
            raise ValueError("colt5.causal: routed image attention is bidirectional; use causal=false")
        self.cfg, self.channel_first = cfg, channel_first
        self.heavy_window = heavy_window
        _, dim_head = cfg.inner_dim(dim)
        self.light = WindowAttention(dim, cfg.light_head_count, dim_head, light_window)
        self.heavy = RoutedHeavyAttention(dim, cfg.heavy_head_count, dim_head, cfg.num_kv_routing_tokens,
                                          cfg.router_kwargs())
        self.aux: dict[str, torch.Tensor] = {}

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = rearrange(fmap, "b c h w -> b h w c") if self.channel_first else fmap
        b, h, w, _ = x.shape
        num_q, num_kv = self.cfg.num_routed_q, self.cfg.num_routed_kv
        if self.heavy_window:
            tokens, valid = _windows(x, self.heavy_window)  # (B * windows, side^2, C)
            heavy, self.aux = self.heavy(tokens, num_q, num_kv, valid)
            heavy = _unwindow(heavy, b, h, w, self.heavy_window)
        else:
            heavy, self.aux = self.heavy(rearrange(x, "b h w c -> b (h w) c"), num_q, num_kv)
            heavy = rearrange(heavy, "b (h w) c -> b h w c", h=h)
        out = self.light(x) + heavy
        return rearrange(out, "b h w c -> b c h w") if self.channel_first else out
