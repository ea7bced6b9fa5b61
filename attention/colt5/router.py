"""The CoLT5 router: learned routing tokens score every token, coordinate descent picks the top-k softly.

Routing runs in float32 with autocast off: coordinate descent divides by eps ~ 0.03 and takes
logsumexp; in bf16 the scores lose the digits that decide which token is routed (and the original's
Triton router failed to compile for bf16 at all).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attention.coor_descent.ops import coor_descent, unconverged_fraction

FETCH_K_RATIO = 9 / 8  # soft budget a little above the hard count, so selected gates sit near 1
CONVERGENCE_TOL = 0.05  # a row is unconverged when its sum misses its budget by more than 5%


class Routed(NamedTuple):
    indices: torch.Tensor  # (B, R, K) long, positions in the sequence; T for a slot routing nothing
    gates: torch.Tensor    # (B, R, K) straight-through: 1 forward, coordinate-descent gradient backward
    mask: torch.Tensor     # (B, R, K) bool, False where a padded position had to be routed
    unconverged: torch.Tensor  # scalar: fraction of coordinate-descent rows that missed their budget


def _flat_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Row numbers of x (B, T, ...) flattened to (B * T, ...) for per-sample indices (B, ...), clamped to
    each sample's last row (empty slots, index T, read a real row and are gated 0)."""
    b, t = x.shape[:2]
    batch = (torch.arange(b, device=x.device) * t).view(-1, *([1] * (indices.ndim - 1)))
    return (indices.clamp(max=t - 1) + batch).reshape(-1)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...), indices: (B, ...) -> (B, ..., ...), row b gathered from x[b] only.

    Indexing by an explicit batch offset is what makes several routes safe with batch > 1 (the
    original gathered multi-route tokens from the wrong batch element). One index_select over the
    flattened rows: its backward is one index_add, and no index tensor as large as the output."""
    rows = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, _flat_rows(x, indices))
    return rows.view(*indices.shape, *x.shape[2:])


def scatter_tokens(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """base: (B, T, D), indices: (B, K), values: (B, K, D) -> base with the indexed rows replaced.

    Indices are unique per row except empty slots (index T), which land on a dropped extra row.
    Out of place, so autograd reaches both base (unrouted rows) and values."""
    b, t, d = base.shape
    padded = F.pad(base, (0, 0, 0, 1)).reshape(b * (t + 1), d)  # row T of each sample collects the empty slots
    rows = (indices + (torch.arange(b, device=base.device) * (t + 1))[:, None]).reshape(-1)
    out = padded.index_copy(0, rows, values.reshape(-1, d).to(base.dtype))
    return out.view(b, t + 1, d)[:, :t]


def add_tokens(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """base: (B, T, D) plus values (B, K, D) added at rows indices (B, K), out of place.

    Empty slots (index T) must carry zero values: they are added to the sample's last row."""
    b, t, d = base.shape
    out = base.reshape(b * t, d).index_add(0, _flat_rows(base, indices), values.reshape(-1, d).to(base.dtype))
    return out.view(b, t, d)


def routing_dtype(x: torch.Tensor) -> torch.dtype:
    """Routing precision: float32 at least, whatever autocast or the activations use."""
    return torch.promote_types(x.dtype, torch.float32)


def straight_through(y: torch.Tensor) -> torch.Tensor:
    """1 in forward, d y in backward: routed tokens keep their full value, the router still learns."""
    return y + (1.0 - y).detach()


class CoordinateDescentRouter(nn.Module):
    """Routes num_tokens of (B, T, dim) per routing token; optionally in blocks of route_block_size,
    each block routing num_tokens // blocks (bounded work per block for very long inputs)."""

    def __init__(self, dim: int, num_routing_tokens: int = 1, *, n_iters: int, eps: float,
                 eps_init: float | None, eps_decay: float, route_block_size: int = 0,
                 backend: str = "auto"):
        super().__init__()
        self.routing_tokens = nn.Parameter(torch.randn(num_routing_tokens, dim))
        self.scale = dim ** -0.5  # scores ~ N(0, 1) for unit-variance (normed) inputs
        self.n_iters, self.eps, self.eps_init, self.eps_decay = n_iters, eps, eps_init, eps_decay
        self.route_block_size = route_block_size
        self.backend = backend

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, R, T) in float32 (float64 for float64 inputs)."""
        dtype = routing_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.einsum("btd,rd->brt", x.to(dtype), self.routing_tokens.to(dtype)) * self.scale

    def forward(self, x: torch.Tensor, num_tokens: int, mask: torch.Tensor | None = None) -> Routed:
        b, t, _ = x.shape
        s = self.scores(x)  # (B, R, T)
        block = self.route_block_size if 0 < self.route_block_size < t else t
        blocks = -(-t // block)
        pad = blocks * block - t
        per_block = min(max(1, num_tokens // blocks), block)
        # (B, R, blocks, block): the last block padded with masked positions. Without padding or a
        # mask the candidates are all positions: mask None keeps the unmasked (fewer kernels) path.
        s_blocks = rearrange(F.pad(s, (0, pad)) if pad else s, "b r (n w) -> b r n w", w=block)
        v_blocks = None
        budget: float | torch.Tensor = min(per_block * FETCH_K_RATIO, block)
        if mask is not None or pad:
            valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
            valid = F.pad(valid[:, None, :].expand_as(s), (0, pad), value=False)
            v_blocks = rearrange(valid, "b r (n w) -> b r n w", w=block)
            budget = v_blocks.sum(-1).clamp(max=budget).to(s.dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = coor_descent(s_blocks, budget, self.n_iters, self.eps, self.eps_init, self.eps_decay,
                             v_blocks, self.backend)
        tol = CONVERGENCE_TOL * (budget.clamp(min=1) if v_blocks is not None else max(budget, 1))
        unconverged = unconverged_fraction(y, budget, tol, v_blocks)
        gates, idx = y.topk(per_block, dim=-1)  # (B, R, blocks, per_block)
        gates = straight_through(gates)
        if v_blocks is None:
            chosen_valid = torch.ones_like(idx, dtype=torch.bool)
        else:
            chosen_valid = v_blocks.gather(-1, idx)
            gates = gates * chosen_valid
        if blocks > 1:
            offsets = (torch.arange(blocks, device=x.device) * block)[:, None]  # (blocks, 1)
            idx = idx + offsets
        if pad:
            idx = idx.masked_fill(idx >= t, t)  # positions in the padding -> T (empty slot)
        return Routed(*(rearrange(v, "b r n k -> b r (n k)") for v in (idx, gates, chosen_valid)),
                      unconverged)
