"""Coordinate descent for a soft top-k (Wright 2015; as used by CoLT5, Ainslie et al. 2023).

For scores s (..., n) and a budget k it finds y in [0, 1]^n with sum(y) ~ k that maximises
<s, y> + eps * H(y) (entropy-regularised top-k). Dual variables: a (one per row) and b (one per
entry). Starting from a = 0, b = -s, each iteration does

    a   = eps * (log k - logsumexp((s + b) / eps))      # row update: fit the budget
    b   = -relu(s + a)                                  # entry update: keep y <= 1
    eps = max(eps * eps_decay, eps_min)                 # epsilon scaling

and the result is y = exp((s + a + b) / eps) = exp(min(s + a, 0) / eps). So the output depends on
the scores and ONE scalar per row: the fused kernels rely on this (`coor_descent_dual` returns it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _iterate(scores: torch.Tensor, k: float | torch.Tensor, n_iters: int, eps: float,
             eps_init: float | None, eps_decay: float, mask: torch.Tensor | None):
    """The iterations shared by both entry points: returns (masked scores, a, b, final eps)."""
    if n_iters < 1:
        raise ValueError(f"n_iters: must be >= 1, got {n_iters}")
    s = scores
    big_negative = torch.finfo(s.dtype).min / 4  # finite: a fully masked row must not produce NaN
    if mask is not None:
        s = s.masked_fill(~mask, big_negative)
    if isinstance(k, torch.Tensor):
        log_k = k.to(s.dtype).clamp(min=1e-20).log().unsqueeze(-1)  # (..., 1)
    else:
        log_k = math.log(k)
    cur_eps = max(eps_init if eps_init is not None else eps, eps)
    b = -s
    a = torch.zeros_like(s[..., :1])
    for _ in range(n_iters):
        z = (s + b) / cur_eps
        if mask is not None:
            z = z.masked_fill(~mask, big_negative)
        a = cur_eps * (log_k - torch.logsumexp(z, dim=-1, keepdim=True))
        b = -F.relu(s + a)
        cur_eps = max(cur_eps * eps_decay, eps)
    return s, a, b, cur_eps


def coor_descent_reference(scores: torch.Tensor, k: float | torch.Tensor, n_iters: int, eps: float,
                           eps_init: float | None = None, eps_decay: float = 1.0,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft top-k weights y (same shape as scores), differentiable.

    scores: (..., n). k: a scalar or one value per row, shape scores.shape[:-1].
    eps: the final (smallest) epsilon; eps_init: the starting epsilon (default eps), decayed by
    eps_decay each iteration down to eps. mask: (..., n) bool, True = candidate; masked entries give 0;
    a fully masked row gives zeros (not NaN)."""
    s, a, b, cur_eps = _iterate(scores, k, n_iters, eps, eps_init, eps_decay, mask)
    y = torch.exp((s + a + b) / cur_eps)
    if mask is not None:
        y = y.masked_fill(~mask, 0.0)
    return y


def coor_descent_dual(scores: torch.Tensor, k: float | torch.Tensor, n_iters: int, eps: float,
                      eps_init: float | None = None, eps_decay: float = 1.0,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The row dual a (..., 1) and the epsilon the result is taken at, same iterations as above.

    coor_descent_reference(...) == exp(min(s + a, 0) / eps_final) (masked entries 0). Routers use it to
    apply one row's threshold to other scores (the causal routers in attention/colt5) and to select
    without the (..., n) output."""
    _, a, _, cur_eps = _iterate(scores, k, n_iters, eps, eps_init, eps_decay, mask)
    return a, cur_eps


# --- coordinate-descent attention ----------------------------------------------------------------------
# Coordinate-descent attention in plain PyTorch (the coordinate-descent-attention seed, made exact).
#
# Softmax over q.k is replaced by coordinate descent with a sparsity budget: per query row i,
# y_i = coor_descent(s_i, k_i) over the visible keys, k_i = min(topk, visible keys), and
#
#     out_i = sum_j y_ij v_j / max(sum_j y_ij, 1e-6)
#
# Dense on purpose (B, H, T, S): the ground truth the fused kernel is tested against.


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
                                     topk: int, n_iters: int, eps: float,
                                     eps_init: float | None = None, eps_decay: float = 1.0,
                                     causal: bool = False, key_mask: torch.Tensor | None = None,
                                     scale: float | None = None) -> torch.Tensor:
    """q: (B, T, H, D), k, v: (B, S, H, D), key_mask: (B, S) bool (True = real key).

    Returns (B, T, H, D); a query with no visible key gets zeros."""
    b, t, h, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    allowed = visible_keys(t, k.shape[1], causal, key_mask, q.device).expand_as(scores)
    budget = allowed.sum(-1).clamp(max=topk).to(scores.dtype)  # (B, H, T): k_i per row
    y = coor_descent_reference(scores, budget, n_iters, eps, eps_init, eps_decay, allowed)
    # Normalise by the row sum: y sums to ~k_i, not 1, so the raw sum would scale the output with k
    # and with how far the row is from converging; the ratio is a weighted mean of values like softmax.
    out = torch.einsum("bhts,bshd->bthd", y, v)
    total = y.sum(-1).clamp(min=1e-6).transpose(1, 2)[..., None]  # (B, T, H, 1)
    return out / total
