from __future__ import annotations

import torch.nn.functional as F

from attention.layers import MultiheadMixer
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


class SoftmaxAttention(MultiheadMixer):
    """Multi-head softmax attention: self or cross (context), causal or not, key padding mask."""

    def attend(self, q, k, v, *, causal, key_mask):
        return softmax_attention(q, k, v, causal=causal, key_mask=key_mask, kernel=self.cfg.kernel)
