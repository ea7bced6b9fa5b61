from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention.layers import QKVProjection, merge_heads, zero_padded
from attention.softmax.config import SoftmaxConfig
from attention.softmax.reference import attention_mask, softmax_attention_reference


def softmax_attention(q, k, v, *, causal=False, key_mask=None, kernel="sdpa"):
    """Dense attention on (B, T, H, D). 'sdpa' lets PyTorch pick flash / memory-efficient kernels."""
    if kernel == "eager":
        return softmax_attention_reference(q, k, v, causal=causal, key_mask=key_mask)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if key_mask is None and (not causal or q.shape[1] == k.shape[1]):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
    else:
        allowed = attention_mask(q.shape[1], k.shape[1], causal, key_mask, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed)
        # SDPA gives NaN for a query that sees no key; the reference gives zeros.
        out = out.nan_to_num(0.0)
    return out.transpose(1, 2)


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention: self or cross (context), causal or not, key padding mask."""

    def __init__(self, cfg: SoftmaxConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        heads, dim_head = cfg.inner_dim(dim)
        self.qkv = QKVProjection(dim, heads, dim_head)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
        q, k, v = self.qkv(x, context)
        key_mask = mask if context is None else context_mask
        y = softmax_attention(q, k, v, causal=self.cfg.causal and context is None,
                              key_mask=key_mask, kernel=self.cfg.kernel)
        return zero_padded(self.drop(self.to_out(merge_heads(y))), mask)
