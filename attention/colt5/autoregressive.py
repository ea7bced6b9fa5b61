"""CoLT5 routed autoregressive attention, memory linear in T.

Windows of heavy_window tokens. Light: causal local attention on every token. Heavy: each window's
routed queries (CausalWindowRouter, no look-ahead) attend to num_routed_kv key/values routed from the
strict past (positions before the window, CausalPrefixRouter), plus a learned null key/value (window
0 has no past). The original copied the whole sequence once per window (T^2 / w memory); here the
key/values are projected once (B, R, T, 2GD) and every window gathers its own K rows of them in one
batch: (T / w) K rows, linear in T. Only when that gather exceeds GATHER_CHUNK_ELEMENTS (a large
num_routed_kv per window) are the windows processed in chunks, each inside a checkpoint.

Per layer the forward is a fixed number of launches whatever T is: the routers' coordinate descent runs
in one Triton launch each on CUDA (causal_router.py), the gathers are index_selects, the windows one
batched attention, and the routed outputs one index_add (the per-window and per-chunk host loops are
gone); on CUDA the whole forward and backward replay from per-shape CUDA graphs (graphs.py,
cfg.cuda_graphs). reference.py keeps the same semantics window by window, as the tests' ground truth.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from attention.colt5.causal_router import CausalPrefixRouter, CausalWindowRouter
from attention.colt5.config import Colt5Config
from attention.colt5.graphs import GraphedForward
from attention.colt5.heavy import HeavyAttention
from attention.colt5.routed import light_local_attention
from attention.colt5.router import add_tokens, gather_tokens
from attention.layers import zero_padded

GATHER_CHUNK_ELEMENTS = 1 << 26  # gathered key/value elements alive at once; above, checkpointed chunks


def gather_kv(kv_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """kv_all: (B, R, T, E), idx: (B, R, c, K) positions (T = empty slot) -> (B, R, c, K, E), one
    index_select over the flattened rows (its backward: one index_add)."""
    b, r, t, e = kv_all.shape
    return gather_tokens(kv_all.reshape(b * r, t, e), idx.reshape(b * r, *idx.shape[2:])).view(*idx.shape, e)


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
        self._graphs = GraphedForward(self)  # per-shape CUDA graphs (graphs.py), when cfg.cuda_graphs

    def _attend_windows(self, x, kv_all, q_idx, kv_idx, kv_gates, kv_mask):
        """c windows at once. x: (B, T, dim); kv_all: (B, R, T, E); q_idx: (B, c, C);
        kv_idx, kv_gates, kv_mask: (B, R, c, K). Returns (B, c, C, dim)."""
        b, c = q_idx.shape[:2]
        q_tokens = rearrange(gather_tokens(x, q_idx), "b c q d -> (b c) q d")
        kv = rearrange(gather_kv(kv_all, kv_idx), "b r c k e -> (b c) r k e")  # (B * c, R, K, E)
        out = self.attn.attend(q_tokens, kv, rearrange(kv_gates, "b r c k -> (b c) r k"),
                               rearrange(kv_mask, "b r c k -> (b c) r k"))
        return rearrange(out, "(b c) q d -> b c q d", b=b)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("colt5: causal routed attention takes no context; set cross_attention=true "
                             "with causal=false for routed cross attention")
        if self.cfg.cuda_graphs:
            out = self._graphs(x, mask)
            if out is not None:
                return out
        return self.forward_eager(x, mask)

    def forward_eager(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, dim = x.shape
        routed_q = self.q_router(x, self.cfg.window_routed_q, mask)            # (B, N, C)
        routed_kv = self.kv_router(x, self.cfg.num_routed_kv, mask)          # (B, R, N, K)
        kv_all = self.attn.project_kv(x)                                      # (B, R, T, E)
        n = routed_q.indices.shape[1]
        _, r, _, k = routed_kv.indices.shape
        chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, b * r * k * kv_all.shape[-1]))
        if chunk >= n:  # every window in one batch: no recomputation
            out = self._attend_windows(x, kv_all, routed_q.indices, *routed_kv)
        else:  # bounded memory: chunks of windows, each recomputed in backward
            parts = []
            for start in range(0, n, chunk):
                part = (routed_q.indices[:, start:start + chunk],
                        *(v[:, :, start:start + chunk] for v in routed_kv))
                if torch.is_grad_enabled():
                    parts.append(checkpoint(self._attend_windows, x, kv_all, *part, use_reentrant=False))
                else:
                    parts.append(self._attend_windows(x, kv_all, *part))
            out = torch.cat(parts, dim=1)
        # Unrouted queries get null_q_out: light + null everywhere, plus (heavy - null) on routed rows
        # (empty slots add zeros), one index_add instead of a scatter into a copy.
        null = self.null_q_out.to(out.dtype)
        heavy = (out * routed_q.gates[..., None].to(out.dtype) - null) * routed_q.mask[..., None]  # (B, N, C, dim)
        light = self.light(x, mask=mask)
        y = add_tokens(light + null.to(light.dtype), rearrange(routed_q.indices, "b n c -> b (n c)"),
                       rearrange(heavy, "b n c d -> b (n c) d"))
        self.aux = {"router_unconverged_q": routed_q.unconverged,
                    "router_load_q": routed_q.mask.float().mean()}
        return zero_padded(y, mask)
