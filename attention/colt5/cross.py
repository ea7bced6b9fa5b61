"""CoLT5 routed cross attention: routed queries of x attend to memories routed from a long context.

The context may be very long (a million tokens): the kv routers (num_kv_routing_tokens of them, each
for its group of heads) route it in blocks of route_block_size, each block contributing
num_routed_kv // blocks memories, and only the routed memories are projected to keys/values, so the
work past the router is independent of the context length. (The original's cross attention
referenced an undefined name and could not run.)
"""

from __future__ import annotations

import torch
from torch import nn

from attention.colt5.config import Colt5Config
from attention.colt5.heavy import HeavyAttention
from attention.colt5.router import CoordinateDescentRouter, gather_tokens, scatter_tokens
from attention.layers import zero_padded


class RoutedCrossAttention(nn.Module):
    def __init__(self, cfg: Colt5Config, dim: int, context_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        _, dim_head = cfg.inner_dim(dim)
        context_dim = context_dim or dim
        kwargs = cfg.router_kwargs()
        self.q_router = CoordinateDescentRouter(dim, 1, **kwargs)
        self.kv_router = CoordinateDescentRouter(context_dim, cfg.num_kv_routing_tokens,
                                                 route_block_size=cfg.route_block_size, **kwargs)
        self.attn = HeavyAttention(dim, cfg.heavy_head_count, dim_head, cfg.num_kv_routing_tokens,
                                   context_dim)
        self.null_q_out = nn.Parameter(torch.zeros(dim))
        self.aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim), context: (B, S, context_dim), context_mask: (B, S) bool -> (B, T, dim)."""
        if context is None:
            raise ValueError("colt5 with cross_attention=true needs context=(B, S, dim)")
        b, t, dim = x.shape
        routed_q = self.q_router(x, min(self.cfg.num_routed_q, t), mask)
        routed_kv = self.kv_router(context, min(self.cfg.num_routed_kv, context.shape[1]), context_mask)
        q_idx = routed_q.indices[:, 0]  # (B, Q)
        kv = self.attn.project_kv(gather_tokens(context, routed_kv.indices))  # (B, R, K, E)
        out = self.attn.attend(gather_tokens(x, q_idx), kv, routed_kv.gates, routed_kv.mask)
        out = out * routed_q.gates[:, 0, :, None].to(out.dtype)
        self.aux = {"router_unconverged_q": routed_q.unconverged,
                    "router_unconverged_kv": routed_kv.unconverged}
        return zero_padded(scatter_tokens(self.null_q_out.to(out.dtype).expand(b, t, dim), q_idx, out), mask)
