"""HoMM's averaging as the original computes it: an explicit (T x S) weight matrix, quadratic.

The ground truth for ops.moment_mix (cumulative sums) and ops.moment_step (running state).
"""

from __future__ import annotations

import torch


def moment_mix_reference(moments: torch.Tensor, select: torch.Tensor, *, causal: bool = False,
                         key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """moments: (B, S, F), select: (B, T, F), key_mask: (B, S) bool -> (B, T, F), in select's dtype.

    weights[b, t, s] = 1 / n_t for each real token s that t sees (s <= t when causal), n_t their
    count; a query that sees none gets 0."""
    batch, t, s = select.shape[0], select.shape[1], moments.shape[1]
    weights = torch.ones(batch, t, s, dtype=moments.dtype, device=moments.device)
    if causal:
        weights = weights.tril()  # the original's dense triangular mask
    if key_mask is not None:
        weights = weights * key_mask.to(moments.dtype)[:, None, :]
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
    return select * torch.einsum("bts,bsf->btf", weights, moments)
