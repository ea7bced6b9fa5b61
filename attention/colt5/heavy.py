"""The heavy attention of CoLT5: routed queries attend to routed key/values, one head group per kv route.

Each kv routing token r routes its own set of key/values; heads are split into R groups and group r
attends to route r's set. A learned null key/value per head is always visible, so no row is empty
(a window with no past, a sample whose routed keys are all padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn


class HeavyAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, num_routes: int = 1,
                 context_dim: int | None = None):
        super().__init__()
        if heads % num_routes:
            raise ValueError(f"heads ({heads}) must be a multiple of the kv routes ({num_routes})")
        self.heads, self.dim_head, self.num_routes = heads, dim_head, num_routes
        self.group = heads // num_routes
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        # One kv projection per route, each for its group of heads: (R, dim, 2 * G * D)
        self.to_kv = nn.Parameter(torch.randn(num_routes, context_dim, 2 * self.group * dim_head)
                                  * context_dim ** -0.5)
        self.null_kv = nn.Parameter(torch.randn(2, heads, dim_head) * 0.02)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def project_kv(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, R, K, dim) (each route's own tokens) or (B, K, dim) (shared) -> (B, R, K, 2GD)."""
        pattern = "brkd,rde->brke" if tokens.ndim == 4 else "bkd,rde->brke"
        return torch.einsum(pattern, tokens, self.to_kv.to(tokens.dtype))

    def attend(self, q_tokens: torch.Tensor, kv: torch.Tensor, kv_gates: torch.Tensor,
               kv_mask: torch.Tensor) -> torch.Tensor:
        """q_tokens: (B, Q, dim); kv: (B, R, K, 2GD) projected; kv_gates, kv_mask: (B, R, K).

        Values are scaled by their gates (1 in forward, straight-through), which is how the kv router
        gets gradient. Returns (B, Q, dim)."""
        b = q_tokens.shape[0]
        q = rearrange(self.to_q(q_tokens), "b q (h d) -> b h q d", h=self.heads)  # (B, H, Q, D)
        k, v = rearrange(kv, "b r n (two g d) -> two b (r g) n d", two=2, g=self.group)  # (B, H, K, D)
        v = v * repeat(kv_gates, "b r n -> b (r g) n 1", g=self.group).to(v.dtype)
        null_k, null_v = (t[None, :, None].expand(b, -1, 1, -1).to(k.dtype) for t in self.null_kv)
        k = torch.cat([null_k, k], dim=2)  # (B, H, 1 + K, D)
        v = torch.cat([null_v, v], dim=2)
        allowed = repeat(kv_mask, "b r n -> b (r g) 1 n", g=self.group)  # (B, H, 1, K)
        allowed = F.pad(allowed, (1, 0), value=True)  # the null key is always visible
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=allowed)
        return self.to_out(rearrange(out, "b h q d -> b q (h d)"))
