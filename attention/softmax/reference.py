"""Dense softmax attention in plain PyTorch: the ground truth every method is compared with."""

from __future__ import annotations

import math

import torch


def attention_mask(t: int, s: int, causal: bool, key_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask, True = attend; None when nothing is masked.

    Causal alignment is to the end: query i sees keys j <= i + (S - T), so a query block appended
    to a cache of S - T keys behaves as in the full sequence."""
    allowed = None
    if causal:
        i = torch.arange(t, device=device)[:, None]
        j = torch.arange(s, device=device)[None, :]
        allowed = (j <= i + (s - t))[None, None]
    if key_mask is not None:
        km = key_mask[:, None, None, :].bool()
        allowed = km if allowed is None else allowed & km
    return allowed


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                causal: bool = False, key_mask: torch.Tensor | None = None,
                                scale: float | None = None) -> torch.Tensor:
    """q: (B, T, H, D), k, v: (B, S, H, D), key_mask: (B, S) bool (True = real key).

    Returns (B, T, H, D). A query with no visible key gets zeros, not NaN."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    allowed = attention_mask(q.shape[1], k.shape[1], causal, key_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: all -inf -> NaN -> 0
    return torch.einsum("bhts,bshd->bthd", probs, v)
