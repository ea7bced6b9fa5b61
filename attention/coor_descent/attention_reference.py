"""Coordinate-descent attention in plain PyTorch (the coordinate-descent-attention seed, made exact).

Softmax over q.k is replaced by coordinate descent with a sparsity budget: per query row i,
y_i = coor_descent(s_i, k_i) over the visible keys, k_i = min(sparsity_k, visible keys), and

    out_i = sum_j y_ij v_j / max(sum_j y_ij, 1e-6)

Dense on purpose (B, H, T, S): the ground truth the fused kernel is tested against.
"""

from __future__ import annotations

import math

import torch

from attention.coor_descent.reference import coor_descent_reference


def visible_keys(t: int, s: int, causal: bool, key_mask: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, S) bool, True = query i may use key j.

    Causal alignment is to the end: key j is visible to query i iff j <= i + S - T."""
    allowed = torch.ones(1, 1, t, s, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(t, device=device)[:, None]
        j = torch.arange(s, device=device)[None, :]
        allowed = allowed & (j <= i + (s - t))
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    return allowed


def coor_descent_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                     sparsity_k: int, n_iters: int, eps: float,
                                     eps_init: float | None = None, eps_decay: float = 1.0,
                                     causal: bool = False, key_mask: torch.Tensor | None = None,
                                     scale: float | None = None) -> torch.Tensor:
    """q: (B, T, H, D), k, v: (B, S, H, D), key_mask: (B, S) bool (True = real key).

    Returns (B, T, H, D); a query with no visible key gets zeros."""
    b, t, h, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    allowed = visible_keys(t, k.shape[1], causal, key_mask, q.device).expand_as(scores)
    budget = allowed.sum(-1).clamp(max=sparsity_k).to(scores.dtype)  # (B, H, T): k_i per row
    y = coor_descent_reference(scores, budget, n_iters, eps, eps_init, eps_decay, allowed)
    # Normalise by the row sum: y sums to ~k_i, not 1, so the raw sum would scale the output with k
    # and with how far the row is from converging; the ratio is a weighted mean of values like softmax.
    out = torch.einsum("bhts,bshd->bthd", y, v)
    total = y.sum(-1).clamp(min=1e-6).transpose(1, 2)[..., None]  # (B, T, H, 1)
    return out / total
