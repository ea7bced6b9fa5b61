"""Top-k attention on the full T x S score matrix in plain PyTorch: the ground truth for tests."""

from __future__ import annotations

import math

import torch

from attention.softmax.reference import attention_mask


def topk_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                             causal: bool = False, key_mask: torch.Tensor | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """q: (B, T, H, D); k, v: (B, S, H, D); key_mask: (B, S) bool, True = real key.

    Per query, the `topk` highest scores among visible keys (causal: j <= i + S - T, as in softmax
    attention) are kept and softmax-normalised; every other key gets weight 0. Exactly `topk` keys are
    kept even under ties (torch.topk picks `topk` indices). A query with fewer visible keys uses all of
    them; one with none gets zeros. Returns (B, T, H, D)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    allowed = attention_mask(q.shape[1], k.shape[1], causal, key_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    kept_idx = scores.topk(min(topk, k.shape[1]), dim=-1).indices  # (B, H, T, K)
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept_idx, True)
    if allowed is not None:
        kept &= allowed  # a row with fewer than k visible keys picked some masked ones: drop them
    scores = scores.masked_fill(~kept, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key -> zeros
    return torch.einsum("bhts,bshd->bthd", probs, v)
