from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention.homm.config import HoMMConfig
from attention.homm.ops import MomentState, expand_moments, homm_mix, init_moment_state, moment_step
from attention.layers import zero_padded


class HoMM(nn.Module):
    """High-order moment mixer: no keys, no heads. Each token selects (sigmoid gates) from the
    mean of the context's moments up to `order`, then projects back. Self or cross (context),
    causal or not, padding mask, recurrent decoding at O(1) cost per token.

    Matches the original HoM module: to_moments = ho_proj, to_select = se_proj, to_out = ag_proj."""

    def __init__(self, cfg: HoMMConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.dim_hidden or dim
        self.width = cfg.order * cfg.order_expand * hidden  # moment features F
        self.to_moments = nn.Linear(dim, self.width)  # W_h: order groups of order_expand * hidden
        self.to_select = nn.Linear(dim, self.width)   # W_q
        self.to_out = nn.Linear(self.width, dim)      # W_o
        self.drop = nn.Dropout(cfg.dropout)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., F): products of GELU'd projections, order 1..order."""
        return expand_moments(F.gelu(self.to_moments(x)), self.cfg.order)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
        source = x if context is None else context
        key_mask = mask if context is None else context_mask
        mixed = homm_mix(self.to_moments(source), self.to_select(x), self.cfg.order,
                         causal=self.cfg.causal and context is None, key_mask=key_mask,
                         backend=self.cfg.backend)  # (B, T, F)
        return zero_padded(self.drop(self.to_out(mixed)), mask)

    def init_state(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> MomentState:
        return init_moment_state(batch, self.width, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: MomentState) -> tuple[torch.Tensor, MomentState]:
        """x_t: (B, dim), the next token of a causal sequence -> (y_t (B, dim), new state)."""
        mixed, state = moment_step(self.moments(x_t), torch.sigmoid(self.to_select(x_t)), state)
        return self.drop(self.to_out(mixed)), state
