"""CoLT5 routed autoregressive attention, memory linear in T.

Windows of heavy_window tokens. Light: causal local attention on every token. Heavy: each window's
routed queries (CausalWindowRouter, no look-ahead) attend to num_routed_kv key/values routed from the
strict past (positions before the window, CausalPrefixRouter), plus a learned null key/value (window
0 has no past). The original copied the whole sequence once per window (T^2 / w memory); here the
key/values are projected once (B, R, T, 2GD) and each chunk of windows gathers its K rows inside a
checkpoint, so only one chunk's (c, K) gather is alive at a time, in forward and in backward.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from attention.colt5.attention import light_local_attention
from attention.colt5.causal_router import CausalPrefixRouter, CausalWindowRouter
from attention.colt5.config import Colt5Config
from attention.colt5.heavy import HeavyAttention
from attention.colt5.router import gather_tokens, scatter_tokens
from attention.layers import zero_padded

GATHER_CHUNK_ELEMENTS = 1 << 24  # gathered key/value elements alive at once


class RoutedAutoregressiveAttention(nn.Module):
    def __init__(self, cfg: Colt5Config, dim: int):
        super().__init__()
        self.cfg = cfg
        _, dim_head = cfg.inner_dim(dim)
        kwargs = cfg.router_kwargs()
        self.light = light_local_attention(cfg, dim, causal=True)
        self.q_router = CausalWindowRouter(dim, cfg.heavy_window, **kwargs)
        self.kv_router = CausalPrefixRouter(dim, cfg.num_kv_routing_tokens, cfg.heavy_window, **kwargs)
        self.attn = HeavyAttention(dim, cfg.heavy_head_count, dim_head, cfg.num_kv_routing_tokens)
        self.null_q_out = nn.Parameter(torch.zeros(dim))
        self.aux: dict[str, torch.Tensor] = {}

    def _attend_windows(self, x, kv_all, q_idx, kv_idx, kv_gates, kv_mask):
        """One chunk of c windows. x: (B, T, dim); kv_all: (B, R, T, E); q_idx: (B, c, C);
        kv_idx, kv_gates, kv_mask: (B, R, c, K). Returns (B, c, C, dim)."""
        b, r, c, k = kv_idx.shape
        t, e = kv_all.shape[2], kv_all.shape[3]
        q_tokens = rearrange(gather_tokens(x, q_idx), "b c q d -> (b c) q d")
        flat = rearrange(kv_idx.clamp(max=t - 1), "b r c k -> b r (c k) 1").expand(-1, -1, -1, e)
        kv = rearrange(kv_all.gather(2, flat), "b r (c k) e -> (b c) r k e", c=c)  # (B*c, R, K, E)
        out = self.attn.attend(q_tokens, kv, rearrange(kv_gates, "b r c k -> (b c) r k"),
                               rearrange(kv_mask, "b r c k -> (b c) r k"))
        return rearrange(out, "(b c) q d -> b c q d", b=b)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("colt5: causal routed attention takes no context; set cross_attention=true "
                             "with causal=false for routed cross attention")
        b, t, dim = x.shape
        routed_q = self.q_router(x, self.cfg.window_routed_q, mask)            # (B, N, C)
        routed_kv = self.kv_router(x, self.cfg.num_routed_kv, mask)          # (B, R, N, K)
        kv_all = self.attn.project_kv(x)                                      # (B, R, T, E)
        n = routed_q.indices.shape[1]
        _, r, _, k = routed_kv.indices.shape
        chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, b * r * k * kv_all.shape[-1]))
        outs = []
        for start in range(0, n, chunk):
            part = (routed_q.indices[:, start:start + chunk],
                    *(v[:, :, start:start + chunk] for v in routed_kv))
            if torch.is_grad_enabled():
                outs.append(checkpoint(self._attend_windows, x, kv_all, *part, use_reentrant=False))
            else:
                outs.append(self._attend_windows(x, kv_all, *part))
        out = torch.cat(outs, dim=1) * routed_q.gates[..., None].to(outs[0].dtype)  # (B, N, C, dim)
        base = self.null_q_out.to(out.dtype).expand(b, t, dim)
        heavy = scatter_tokens(base, rearrange(routed_q.indices, "b n c -> b (n c)"),
                               rearrange(out, "b n c d -> b (n c) d"))
        self.aux = {"router_unconverged_q": routed_q.unconverged,
                    "router_load_q": routed_q.mask.float().mean()}
        return zero_padded(self.light(x, mask=mask) + heavy, mask)
