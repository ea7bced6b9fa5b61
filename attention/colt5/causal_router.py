"""Routers that never look ahead, for the autoregressive CoLT5 variants.

A router that takes the top-k over a whole sequence (or a whole window) leaks the future: whether
token i is routed depends on the scores of later tokens. Two causal replacements:

- CausalWindowRouter (queries, feed-forward tokens): windows of w tokens; window n applies the
  coordinate-descent threshold a_{n-1} of window n - 1 (budget C) to its own scores,
  y_i = exp(min(s_i + a_{n-1}, 0) / eps); tokens with y_i >= 1/2 are candidates and the first C of
  them in position order take the C slots. Token i's fate depends on s_i, the past window and the
  candidates before i only. Window 0 uses a learned threshold.
- CausalPrefixRouter (key/values): window n's queries get the top-K tokens of positions < n * w,
  gated by the coordinate-descent threshold of that prefix. Computed window-chunk by chunk without
  autograd (indices and one scalar per window), so memory stays linear in T; the gates
  exp(min(s_i + a_n, 0) / eps) are rebuilt with autograd for the K selected tokens only, with a_n
  held constant (gradient reaches each selected token's own score).

Backends (`backend`, attention.backend.resolve): on CUDA ('auto') both routers run their coordinate
descent in one Triton launch over every window (router_kernel.py: the window duals with their exact
backward, the prefix top-K and duals); the PyTorch code below is their reference, and the CPU path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attention.backend import resolve
from attention.colt5.router import CONVERGENCE_TOL, FETCH_K_RATIO, routing_dtype, straight_through
from attention.coor_descent.reference import coor_descent_dual

PREFIX_CHUNK_ELEMENTS = 1 << 22  # (windows x T) scores materialised at once by the prefix router


class WindowRouted(NamedTuple):
    indices: torch.Tensor  # (B, N, C) positions in the sequence; T for an empty slot
    gates: torch.Tensor    # (B, N, C) straight-through gates, 0 for empty slots
    mask: torch.Tensor     # (B, N, C) bool, True = a token was routed to this slot
    unconverged: torch.Tensor


def _scores(x: torch.Tensor, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, T, dim) x (R, dim) -> (B, R, T) in routing_dtype, autocast off (see router.py)."""
    dtype = routing_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum("btd,rd->brt", x.to(dtype), tokens.to(dtype)) * scale


class CausalWindowRouter(nn.Module):
    def __init__(self, dim: int, window: int, *, n_iters: int, eps: float, eps_init: float | None,
                 eps_decay: float, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.window = window
        self.routing_token = nn.Parameter(torch.randn(1, dim))
        self.first_threshold = nn.Parameter(torch.zeros(()))  # a for window 0, which has no past
        self.scale = dim ** -0.5
        self.n_iters, self.eps, self.eps_init, self.eps_decay = n_iters, eps, eps_init, eps_decay

    def forward(self, x: torch.Tensor, capacity: int, mask: torch.Tensor | None = None) -> WindowRouted:
        b, t, _ = x.shape
        w = self.window
        n = -(-t // w)
        capacity = min(capacity, w)
        s = _scores(x, self.routing_token, self.scale)[:, 0]  # (B, T)
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        s = rearrange(F.pad(s, (0, n * w - t)), "b (n w) -> b n w", w=w)  # (B, N, W)
        valid = rearrange(F.pad(valid, (0, n * w - t), value=False), "b (n w) -> b n w", w=w)
        with torch.autocast(x.device.type, enabled=False):
            budget = valid.sum(-1).clamp(max=capacity).to(s.dtype)  # (B, N)
            a, eps_final, own_sum = self._duals(s, budget, valid)  # a: (B, N, 1)
            first = self.first_threshold.to(s.dtype).expand(b, 1, 1)
            a_prev = torch.cat([first, a[:, :-1]], dim=1)  # window n uses window n - 1's threshold
            y = torch.exp(torch.clamp(s + a_prev, max=0.0) / eps_final) * valid
        with torch.no_grad():  # rows whose own fit misses the budget (rows with no candidate not counted)
            counted = valid.any(-1)
            missed = ((own_sum - budget).abs() > CONVERGENCE_TOL * budget.clamp(min=1)) & counted
            unconverged = missed.sum() / counted.sum().clamp(min=1)
        candidate = y >= 0.5
        pos = torch.arange(w, device=x.device)
        # Position priority: candidates first, in order; argsort of a key that is unique per window.
        order = torch.where(candidate, pos, pos + w).argsort(dim=-1)[..., :capacity]  # (B, N, C)
        routed = candidate.gather(-1, order)
        gates = straight_through(y.gather(-1, order)) * routed
        starts = (torch.arange(n, device=x.device) * w)[:, None]
        idx = (order + starts).masked_fill(~routed, t)
        return WindowRouted(idx, gates, routed, unconverged)

    def _duals(self, s: torch.Tensor, budget: torch.Tensor, valid: torch.Tensor):
        """Each window's dual a (B, N, 1), differentiable; eps_final; the row sums of its own fit."""
        args = (self.n_iters, self.eps, self.eps_init, self.eps_decay)
        if resolve(self.backend, s) == "triton" and s.dtype == torch.float32:
            from attention.colt5.router_kernel import window_dual_triton  # needs triton: lazy

            return window_dual_triton(s, valid, budget, *args)
        a, eps_final = coor_descent_dual(s, budget, *args, valid)
        with torch.no_grad():
            own = torch.exp(torch.clamp(s + a, max=0.0) / eps_final) * valid
        return a, eps_final, own.sum(-1)


class PrefixRouted(NamedTuple):
    indices: torch.Tensor  # (B, R, N, K) positions < n * w; T for an empty slot
    gates: torch.Tensor    # (B, R, N, K)
    mask: torch.Tensor     # (B, R, N, K) bool


class CausalPrefixRouter(nn.Module):
    def __init__(self, dim: int, num_routing_tokens: int, window: int, *, n_iters: int, eps: float,
                 eps_init: float | None, eps_decay: float, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.window = window
        self.routing_tokens = nn.Parameter(torch.randn(num_routing_tokens, dim))
        self.scale = dim ** -0.5
        self.n_iters, self.eps, self.eps_init, self.eps_decay = n_iters, eps, eps_init, eps_decay

    @torch.no_grad()
    def _select(self, s: torch.Tensor, valid: torch.Tensor, n: int, k: int):
        """Per window n: top-k positions among valid p < n * w, and the prefix's dual a_n.

        s, valid: (B, R, T). Returns indices (B, R, N, K), their validity, a (B, R, N, 1), eps."""
        b, r, t = s.shape
        w = self.window
        chunk = max(1, PREFIX_CHUNK_ELEMENTS // max(1, b * r * t))
        pos = torch.arange(t, device=s.device)
        idx_parts, ok_parts, a_parts, eps_final = [], [], [], self.eps
        for start in range(0, n, chunk):
            ends = torch.arange(start, min(n, start + chunk), device=s.device) * w  # prefix ends
            visible = valid[:, :, None, :] & (pos < ends[:, None])  # (B, R, c, T)
            scores = s[:, :, None, :].expand_as(visible)
            top = scores.masked_fill(~visible, float("-inf")).topk(k, dim=-1)
            idx_parts.append(top.indices)
            ok_parts.append(visible.gather(-1, top.indices))
            budget = visible.sum(-1).clamp(max=k * FETCH_K_RATIO).to(s.dtype)
            a, eps_final = coor_descent_dual(scores, budget, self.n_iters, self.eps, self.eps_init,
                                             self.eps_decay, visible)
            a_parts.append(a)
        return torch.cat(idx_parts, 2), torch.cat(ok_parts, 2), torch.cat(a_parts, 2), eps_final

    def forward(self, x: torch.Tensor, num_tokens: int, mask: torch.Tensor | None = None) -> PrefixRouted:
        b, t, _ = x.shape
        n = -(-t // self.window)
        k = min(num_tokens, t)
        s = _scores(x, self.routing_tokens, self.scale)  # (B, R, T)
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        if resolve(self.backend, s) == "triton" and s.dtype == torch.float32:
            from attention.colt5.router_kernel import prefix_route_triton  # needs triton: lazy

            idx, a, eps_final = prefix_route_triton(s.detach(), valid, self.window, k, self.n_iters, self.eps,
                                                    self.eps_init, self.eps_decay, FETCH_K_RATIO)
            ok = idx < t
        else:
            idx, ok, a, eps_final = self._select(s.detach(), valid[:, None, :].expand_as(s), n, k)
        with torch.autocast(x.device.type, enabled=False):
            # Gather from (B, R, T), not an expanded (B, R, N, T): its backward would allocate N x T.
            flat = rearrange(idx, "b r n k -> b r (n k)").clamp(max=t - 1)
            chosen = s.gather(-1, flat).view(idx.shape)  # (B, R, N, K)
            gates = straight_through(torch.exp(torch.clamp(chosen + a, max=0.0) / eps_final)) * ok
        return PrefixRouted(idx.masked_fill(~ok, t), gates, ok)
