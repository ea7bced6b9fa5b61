from __future__ import annotations

import torch
from torch import nn

from attention.layers import QKVProjection, merge_heads, zero_padded
from attention.linear.chunked import LinearState, init_linear_state
from attention.linear.config import LinearConfig
from attention.linear.features import PerformerFeatures
from attention.linear.ops import linear_attention, linear_attention_step


class LinearAttention(nn.Module):
    """Multi-head linear attention: self or cross (context), causal or not, key padding mask, and
    recurrent decoding (init_state / step) at O(1) cost per token."""

    def __init__(self, cfg: LinearConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.heads, self.dim_head = cfg.inner_dim(dim)
        self.qkv = QKVProjection(dim, self.heads, self.dim_head)
        # The projection is a buffer of this submodule: saved with the model, redrawn in place.
        self.features = (PerformerFeatures(self.dim_head, cfg.nb_features, cfg.redraw)
                         if cfg.feature_map == "performer" else None)
        self.to_out = nn.Linear(self.heads * self.dim_head, dim)
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def nb_features(self) -> int:
        """Width of phi(k): the random feature count for Performer, dim_head otherwise."""
        return self.features.nb_features if self.features is not None else self.dim_head

    def _op_args(self) -> dict:
        projection = self.features.projection if self.features is not None else None
        return {"feature_map": self.cfg.feature_map, "eps": self.cfg.eps, "projection": projection,
                "backend": self.cfg.backend}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
        if self.features is not None and self.training:
            self.features.advance()
        q, k, v = self.qkv(x, context)  # (B, T|S, H, D)
        key_mask = mask if context is None else context_mask
        y = linear_attention(q, k, v, causal=self.cfg.causal and context is None, key_mask=key_mask,
                             chunk_size=self.cfg.chunk_size, **self._op_args())
        return zero_padded(self.drop(self.to_out(merge_heads(y))), mask)

    def init_state(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> LinearState:
        return init_linear_state(batch, self.heads, self.nb_features, self.dim_head,
                                 performer=self.features is not None, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: LinearState) -> tuple[torch.Tensor, LinearState]:
        """x_t: (B, dim), the next token of a causal sequence -> (y_t (B, dim), new state)."""
        q, k, v = (t[:, 0] for t in self.qkv(x_t[:, None]))  # (B, H, D)
        y, state = linear_attention_step(q, k, v, state, **self._op_args())
        return self.drop(self.to_out(merge_heads(y[:, None])))[:, 0], state  # (B, 1, H, Dv) -> (B, dim)
