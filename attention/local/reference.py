"""Local (sliding-window) attention as a dense masked T x T softmax: the ground truth for tests.

Quadratic in T on purpose: it states the band position by position, independently of the blocked
computation the mixer uses (attention/local/mixer.py).
"""

from __future__ import annotations

import math

import torch


def local_band_mask(t: int, window_size: int, look_backward: int, look_forward: int, causal: bool,
                    device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool, True = query i sees key j.

    win(p) = p // window_size; i sees j iff win(i) - look_backward <= win(j) <= win(i) + look_forward,
    and j <= i when causal."""
    pos = torch.arange(t, device=device)
    win = pos // window_size
    wi, wj = win[:, None], win[None, :]
    allowed = (wj >= wi - look_backward) & (wj <= wi + look_forward)
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    return allowed


def local_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int,
                              look_backward: int = 1, look_forward: int = 0, causal: bool = False,
                              key_mask: torch.Tensor | None = None,
                              scale: float | None = None) -> torch.Tensor:
    """q, k, v: (B, T, H, D); key_mask: (B, T) bool, True = real token. Returns (B, T, H, D).

    A query that sees no key (all keys in its band padded) gets zeros."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    t = q.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # (B, H, T, T)
    allowed = local_band_mask(t, window_size, look_backward, look_forward, causal, q.device)[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()  # (B, 1, T, T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key -> zeros
    return torch.einsum("bhij,bjhd->bihd", probs, v)
