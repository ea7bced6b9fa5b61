"""CoLT5 routed feed-forward: a light feed-forward on every token plus a heavy one on routed tokens,
scattered back gated by the router (unrouted tokens get the light branch only)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from attention.colt5.causal_router import CausalWindowRouter
from attention.colt5.config import Colt5Config
from attention.colt5.graphs import GraphedForward
from attention.colt5.router import CoordinateDescentRouter, add_tokens, gather_tokens
from attention.layers import zero_padded


class FeedForwardBranch(nn.Module):
    def __init__(self, dim: int, mult: float, dropout: float = 0.0):
        super().__init__()
        hidden = max(1, int(dim * mult))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _RoutedFeedForwardBase(nn.Module):
    def __init__(self, cfg: Colt5Config, dim: int):
        super().__init__()
        self.cfg = cfg
        self.light = FeedForwardBranch(dim, cfg.light_ff_mult, cfg.dropout)
        self.heavy = FeedForwardBranch(dim, cfg.heavy_ff_mult, cfg.dropout)
        self.aux: dict[str, torch.Tensor] = {}

    def _combine(self, x, idx, gates, mask):
        """idx, gates: (B, K) routed positions (T = empty slot, gate 0) -> light(x) + heavy added at the
        routed rows (one index_add; empty slots add zeros)."""
        heavy = self.heavy(gather_tokens(x, idx)) * gates[..., None].to(x.dtype)  # (B, K, dim)
        return zero_padded(add_tokens(self.light(x), idx, heavy), mask)


class RoutedFeedForward(_RoutedFeedForwardBase):
    """Bidirectional: the router picks num_routed_ff tokens of the whole sequence (or per route block)."""

    def __init__(self, cfg: Colt5Config, dim: int):
        super().__init__(cfg, dim)
        self.router = CoordinateDescentRouter(dim, 1, route_block_size=cfg.route_block_size,
                                              **cfg.router_kwargs())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        routed = self.router(x, min(self.cfg.num_routed_ff, x.shape[1]), mask)
        self.aux = {"router_unconverged_ff": routed.unconverged}
        return self._combine(x, routed.indices[:, 0], routed.gates[:, 0], mask)


class CausalRoutedFeedForward(_RoutedFeedForwardBase):
    """Autoregressive: up to window_routed_ff tokens per heavy_window, chosen without look-ahead
    (CausalWindowRouter), so token i's output depends on tokens <= i only."""

    def __init__(self, cfg: Colt5Config, dim: int):
        super().__init__(cfg, dim)
        self.router = CausalWindowRouter(dim, cfg.heavy_window, **cfg.router_kwargs())
        self._graphs = GraphedForward(self)  # per-shape CUDA graphs (graphs.py), when cfg.cuda_graphs

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.cuda_graphs:
            out = self._graphs(x, mask)
            if out is not None:
                return out
        return self.forward_eager(x, mask)

    def forward_eager(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        routed = self.router(x, self.cfg.window_routed_ff, mask)  # (B, N, C)
        self.aux = {"router_unconverged_ff": routed.unconverged, "router_load_ff": routed.mask.float().mean()}
        return self._combine(x, rearrange(routed.indices, "b n c -> b (n c)"),
                             rearrange(routed.gates, "b n c -> b (n c)"), mask)


def routed_feedforward(cfg: Colt5Config, dim: int) -> nn.Module | None:
    """The block's feed-forward for a colt5 config; None (the dense default) when route_ff is off."""
    if not cfg.route_ff:
        return None
    return CausalRoutedFeedForward(cfg, dim) if cfg.causal else RoutedFeedForward(cfg, dim)
