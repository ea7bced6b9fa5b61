"""Public ops of coordinate descent: the soft top-k, its convergence stats, a differentiable top-k and
coordinate-descent attention, each dispatched to the Triton kernel on CUDA or the reference elsewhere."""

from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple

import torch

from attention.backend import resolve
from attention.coor_descent.reference import coor_descent_attention_reference, coor_descent_reference

_missing_warned: set[str] = set()


def _kernel(module: str, name: str, backend: str, x: torch.Tensor):
    """The Triton function `name` of attention.coor_descent.<module>, or None for the reference.

    backend='auto' falls back to the reference (with one warning) while the kernel module does not
    exist yet; backend='triton' then fails, saying so."""
    if resolve(backend, x) != "triton":
        return None
    full = f"attention.coor_descent.{module}"
    try:
        return getattr(importlib.import_module(full), name)
    except ModuleNotFoundError as err:
        if err.name != full or backend == "triton":
            raise
        if full not in _missing_warned:
            _missing_warned.add(full)
            warnings.warn(f"{full} is not available; coordinate descent runs the PyTorch reference",
                          stacklevel=3)
        return None


def _check(n_iters: int, eps: float, eps_init: float | None, eps_decay: float) -> None:
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters: must be an integer >= 1, got {n_iters!r}")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps!r}")
    if eps_init is not None and not eps_init > 0:
        raise ValueError(f"eps_init: must be > 0 or None, got {eps_init!r}")
    if not 0 < eps_decay <= 1:
        raise ValueError(f"eps_decay: must be in (0, 1], got {eps_decay!r}")


def coor_descent(scores: torch.Tensor, k: float | torch.Tensor, n_iters: int, eps: float,
                 eps_init: float | None = None, eps_decay: float = 1.0, mask: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """Soft top-k weights y in [0, 1], shape of `scores` (..., n); see reference.py for the algorithm.

    k: a scalar or one value per row (scores.shape[:-1]); mask: (..., n) bool, True = candidate."""
    _check(n_iters, eps, eps_init, eps_decay)
    kernel = _kernel("kernel", "coor_descent_triton", backend, scores)
    fn = kernel or coor_descent_reference
    return fn(scores, k, n_iters, eps, eps_init, eps_decay, mask)


def convergence(y: torch.Tensor, k: float | torch.Tensor, tol: float,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """How many rows of a coordinate-descent output miss their budget: |sum(y) - k| > tol.

    y: (..., n); k: scalar or per row; mask: (..., n) bool, rows with no candidate are not counted
    (their sum is 0 by definition). Returns scalar tensors: rows, unconverged, unconverged_frac,
    max_gap (the largest |sum - k|). A router whose rows sum well below k is routing fewer tokens
    softly than it selects hard: its straight-through gates then carry little gradient."""
    with torch.no_grad():
        sums = y.detach().float().sum(-1)
        target = k.float() if isinstance(k, torch.Tensor) else torch.full_like(sums, float(k))
        gap = (sums - target).abs()
        counted = torch.ones_like(sums, dtype=torch.bool) if mask is None else mask.any(-1)
        gap = torch.where(counted, gap, torch.zeros_like(gap))
        rows = counted.sum()
        missed = ((gap > tol) & counted).sum()
        return {"rows": rows, "unconverged": missed,
                "unconverged_frac": missed.float() / rows.clamp(min=1).float(),
                "max_gap": gap.max() if gap.numel() else gap.new_zeros(())}


def unconverged_fraction(y: torch.Tensor, k: float | torch.Tensor, tol: float | torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """convergence(...)["unconverged_frac"] in a few kernels: routers compute it every forward (a
    logged aux value), and each small kernel is a launch in an eager training step."""
    with torch.no_grad():
        missed = (y.detach().float().sum(-1) - k).abs() > tol
        if mask is None:
            return missed.float().mean()
        counted = mask.any(-1)  # rows with no candidate sum to 0 by definition: not counted
        return (missed & counted).sum() / counted.sum().clamp(min=1)


class TopK(NamedTuple):
    values: torch.Tensor   # (..., k) x at the selected indices
    indices: torch.Tensor  # (..., k) long
    gates: torch.Tensor    # (..., k) soft weights in [0, 1] (straight-through: 1 forward, soft backward)


def topk(x: torch.Tensor, k: int, n_iters: int = 50, eps: float = 0.1, eps_init: float | None = 1.0,
         eps_decay: float = 0.85, mask: torch.Tensor | None = None, fetch_k_ratio: float = 9 / 8,
         straight_through: bool = True, backend: str = "auto") -> TopK:
    """Differentiable top-k along the last dim: indices of the k largest, and gates from coordinate
    descent with budget min(k * fetch_k_ratio, n) (a slightly larger soft budget keeps the selected
    gates near 1). `values * gates` is the differentiable selection; gradient reaches x through both.
    With a mask, selected masked entries (only when fewer than k candidates) get gate 0."""
    n = x.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, {n}] (the last dim), got {k}")
    if fetch_k_ratio < 1:
        raise ValueError(f"fetch_k_ratio: must be >= 1, got {fetch_k_ratio}")
    budget: float | torch.Tensor = min(k * fetch_k_ratio, n)
    if mask is not None:
        budget = mask.sum(-1).to(x.dtype).clamp(max=budget)
    y = coor_descent(x, budget, n_iters, eps, eps_init, eps_decay, mask, backend)
    gates, indices = y.topk(k, dim=-1)
    if straight_through:
        gates = gates + (1.0 - gates).detach()
    if mask is not None:
        gates = gates * mask.gather(-1, indices).to(gates.dtype)
    return TopK(x.gather(-1, indices), indices, gates)


def coor_descent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                           n_iters: int, eps: float, eps_init: float | None = None, eps_decay: float = 1.0,
                           causal: bool = False, key_mask: torch.Tensor | None = None,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention whose weights are coordinate descent over q.k (budget topk) instead of softmax.

    q: (B, T, H, D), k, v: (B, S, H, D), key_mask: (B, S) bool. Returns (B, T, H, D); see
    reference.py for the exact definition."""
    _check(n_iters, eps, eps_init, eps_decay)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: must be an integer >= 1, got {topk!r}")
    kernel = _kernel("kernel", "coor_descent_attention_triton", backend, q)
    fn = kernel or coor_descent_attention_reference
    return fn(q, k, v, topk=topk, n_iters=n_iters, eps=eps, eps_init=eps_init,
              eps_decay=eps_decay, causal=causal, key_mask=key_mask, scale=scale)
