"""The colt5 token mixer and feed-forward factories the registry calls."""

from __future__ import annotations

from torch import nn

from attention.colt5.autoregressive import RoutedAutoregressiveAttention
from attention.colt5.config import Colt5Config
from attention.colt5.cross import RoutedCrossAttention
from attention.colt5.feedforward import routed_feedforward
from attention.colt5.routed import RoutedAttention


def colt5_mixer(cfg: Colt5Config, dim: int) -> nn.Module:
    """Routed cross attention when cross_attention, the autoregressive variant when causal, else the
    bidirectional routed attention. Each maps (B, T, dim) -> (B, T, dim) and sets `aux`."""
    if cfg.cross_attention:
        return RoutedCrossAttention(cfg, dim)
    if cfg.causal:
        return RoutedAutoregressiveAttention(cfg, dim)
    return RoutedAttention(cfg, dim)


def colt5_feedforward(cfg: Colt5Config, dim: int) -> nn.Module | None:
    return routed_feedforward(cfg, dim)
