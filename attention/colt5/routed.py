"""CoLT5 routed attention (not causal): light local attention on every token plus heavy attention
between routed queries and routed key/values; unrouted queries get a learned output."""

from __future__ import annotations

import torch
from torch import nn

from attention.colt5.config import Colt5Config
from attention.colt5.heavy import HeavyAttention
from attention.colt5.router import CoordinateDescentRouter, gather_tokens, scatter_tokens
from attention.layers import zero_padded
from attention.local import LocalAttention, LocalConfig


def light_local_attention(cfg: Colt5Config, dim: int, causal: bool) -> LocalAttention:
    """Sliding-window attention over windows of light_window: neighbours on both sides, or the past."""
    local = LocalConfig(heads=cfg.light_head_count, dim_head=cfg.dim_head, causal=causal,
                        window_size=cfg.light_window, look_backward=1, look_forward=0 if causal else 1,
                        backend=cfg.backend)
    return LocalAttention(local, dim)


class RoutedHeavyAttention(nn.Module):
    """The heavy branch alone: route num_q queries and num_kv key/values per kv route, attend, scatter
    the outputs back (gated by the query router) over a learned output for unrouted queries."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_kv_routes: int, router_kwargs: dict,
                 route_block_size: int = 0):
        super().__init__()
        self.q_router = CoordinateDescentRouter(dim, 1, route_block_size=route_block_size, **router_kwargs)
        self.kv_router = CoordinateDescentRouter(dim, num_kv_routes, route_block_size=route_block_size,
                                                 **router_kwargs)
        self.attn = HeavyAttention(dim, heads, dim_head, num_kv_routes)
        self.null_q_out = nn.Parameter(torch.zeros(dim))  # output of a query no router picked

    def forward(self, x: torch.Tensor, num_q: int, num_kv: int, mask: torch.Tensor | None = None):
        """x: (B, T, dim) -> ((B, T, dim), aux)."""
        b, t, dim = x.shape
        routed_q = self.q_router(x, min(num_q, t), mask)
        routed_kv = self.kv_router(x, min(num_kv, t), mask)
        q_idx, q_gates = routed_q.indices[:, 0], routed_q.gates[:, 0]  # (B, Q)
        kv = self.attn.project_kv(gather_tokens(x, routed_kv.indices))  # (B, R, K, 2GD)
        out = self.attn.attend(gather_tokens(x, q_idx), kv, routed_kv.gates, routed_kv.mask)  # (B, Q, dim)
        out = out * q_gates[..., None].to(out.dtype)
        base = self.null_q_out.to(out.dtype).expand(b, t, dim)
        aux = {"router_unconverged_q": routed_q.unconverged, "router_unconverged_kv": routed_kv.unconverged}
        return scatter_tokens(base, q_idx, out), aux


class RoutedAttention(nn.Module):
    """CoLT5 attention over (B, T, dim), bidirectional, with a key padding mask."""

    def __init__(self, cfg: Colt5Config, dim: int):
        super().__init__()
        self.cfg = cfg
        heads, dim_head = cfg.inner_dim(dim)
        self.light = light_local_attention(cfg, dim, causal=False)
        self.heavy = RoutedHeavyAttention(dim, cfg.heavy_head_count, dim_head, cfg.num_kv_routing_tokens,
                                          cfg.router_kwargs(), cfg.route_block_size)
        self.aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("colt5: context given but cross_attention is false; set cross_attention=true "
                             "for routed cross attention")
        heavy, self.aux = self.heavy(x, self.cfg.num_routed_q, self.cfg.num_routed_kv, mask)
        return zero_padded(self.light(x, mask=mask) + heavy, mask)
