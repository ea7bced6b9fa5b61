"""Which keys each query sees, and how they split into the P cells of the compressed key width.

Keys are counted in rank space: the r-th real (unpadded) key has rank r. Query i sees the L_i real
keys of lowest rank (all of them; causal: those at positions <= i + S - T), so padding and causality
are one thing: a length. Cell b of query i holds ranks [floor(b L_i / P), floor((b + 1) L_i / P)):
the compressed map of every query covers exactly the keys it may see, stretched to P cells (SEA's
causal resize). With L_i < P some cells are empty.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KeyGeometry(NamedTuple):
    visible: torch.Tensor      # (B, T) int64: L_i, the number of real keys query i sees
    rank_to_pos: torch.Tensor  # (B, S) int64: position of the real key of rank r (ranks >= n_real: padding)
    bins: int                  # P, the compressed width


def key_geometry(batch: int, t: int, s: int, causal: bool, key_mask: torch.Tensor | None, bins: int,
                 device: torch.device) -> KeyGeometry:
    """Geometry of T queries over S keys; key_mask (B, S) bool, True = real key."""
    real = (torch.ones(batch, s, dtype=torch.bool, device=device) if key_mask is None
            else key_mask.to(device=device, dtype=torch.bool))
    count = real.long().cumsum(1)  # (B, S): real keys at positions <= j
    if causal:
        last = torch.arange(t, device=device) + (s - t)  # the last position query i may see
        seen = count.gather(1, last.clamp(0, s - 1)[None].expand(batch, t))
        visible = torch.where(last[None] >= 0, seen, torch.zeros_like(seen))
    else:
        visible = count[:, -1:].expand(batch, t)
    # Real keys first, in position order (a stable sort of the padding flag).
    rank_to_pos = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)
    return KeyGeometry(visible.contiguous(), rank_to_pos, bins)


def bin_bounds(visible: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, T) lengths -> (B, T, P + 1) rank bounds floor(b L / P): cell b holds [bound_b, bound_b+1)."""
    steps = torch.arange(bins + 1, device=visible.device)
    return (visible[..., None] * steps) // bins


def bin_of_rank(rank: torch.Tensor, visible: torch.Tensor, bins: int) -> torch.Tensor:
    """The cell holding key rank r < L for a query of length L (broadcasting): the largest b with
    floor(b L / P) <= r, i.e. ceil((r + 1) P / L) - 1."""
    return ((rank + 1) * bins - 1) // visible.clamp_min(1)


def rank_of_position(key_mask: torch.Tensor | None, batch: int, s: int, device: torch.device) -> torch.Tensor:
    """(B, S): rank of the key at each position (padding: -1)."""
    real = (torch.ones(batch, s, dtype=torch.bool, device=device) if key_mask is None
            else key_mask.to(device=device, dtype=torch.bool))
    return torch.where(real, real.long().cumsum(1) - 1, torch.full_like(real, -1, dtype=torch.long))
