"""From the compressed estimate to a sparse mask of about k keys per query: grouped top-k over the cells,
then expansion of the chosen cells back to key ranks.

Budget: a query that sees L keys in P' = min(L, P) non-empty cells picks
    n = clamp(round(k P' / L), 1, P')
cells per head, about k keys (a cell holds ~L / P' keys). Grouping 'head' picks each head's top n; 'query'
picks the top H n of all heads' cells jointly (SEA's causal_batch), after promoting each head's best
cell so that no head is left without keys. A cell wider than k (L / P > k) contributes k keys evenly
spaced through it. Cells of query i only hold ranks < L_i: causal by construction.

The mask is kept compressed: a flat list of the chosen cells (rank range, key count) with offsets per
(query, head), as CSR. Selection runs over chunks of queries; nothing of size T x S exists, and
`expand_cells` lists the keys of a block of queries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attention.config import ConfigError
from attention.sea.config import TOPK_GROUPS
from attention.sea.geometry import KeyGeometry, bin_bounds

CHUNK_ELEMENTS = {"cuda": 2**25, "cpu": 2**22}  # estimate entries ranked at once: B x C x H x P


class SparseMask(NamedTuple):
    """The chosen cells of every (batch, query, head), flat (CSR): the cells of (b, i, h) are entries
    offsets[b, i, h] .. offsets[b, i, h + 1] - 1, sorted by cell, and those of a query are contiguous."""

    cell_start: torch.Tensor  # (N,) int32: first key rank of the cell
    cell_width: torch.Tensor  # (N,) int32: ranks the cell spans
    cell_keys: torch.Tensor   # (N,) int32: keys taken from it, min(width, k)
    offsets: torch.Tensor     # (B, T, H + 1) int64
    slots: int                # the most keys any query attends to, all heads together
    max_cells: int            # the most cells any query has


def cells_per_query(visible: torch.Tensor, bins: int, k: int) -> torch.Tensor:
    """(B, T) -> cells each head of each query picks: clamp(round(k P' / L), 1, P'), 0 when L = 0."""
    nonempty = visible.clamp(max=bins)
    length = visible.clamp_min(1)
    n = (2 * k * nonempty + length) // (2 * length)  # round half up, in integers
    return torch.minimum(n.clamp_min(1), nonempty)


def _select_chunk(score, budget, group):
    """score (C, B, H, P) with -inf at empty cells, budget (C, B) -> chosen flat cells h P + c, sorted,
    (C, B, n) with H P for unused entries."""
    _, _, h, p = score.shape
    n_max = int(budget.max())
    if n_max == 0:
        return torch.full((*score.shape[:2], 1), h * p, dtype=torch.long, device=score.device)
    ranked = torch.arange(n_max, device=score.device)
    if group == "head":
        top = score.topk(n_max, -1).indices  # (C, B, H, n)
        flat = top + torch.arange(h, device=score.device)[:, None] * p
        flat = torch.where(ranked < budget[..., None, None], flat, h * p).flatten(2)
    else:
        best = score.argmax(-1, keepdim=True)  # each head's best cell goes first
        score = score.scatter(-1, best, score.gather(-1, best) + 2.0)  # probabilities are <= 1
        top = score.flatten(2).topk(n_max, -1).indices  # (C, B, n) over H x P
        flat = torch.where(ranked < budget[..., None], top, h * p)
    return flat.sort(-1).values


def select_cells(est: torch.Tensor, geometry: KeyGeometry, k: int, group: str = "head",
                 chunk_elements: int | None = None) -> SparseMask:
    """est: (B, T, H, P) estimated probabilities per cell (no gradient flows through a selection)."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS.get(est.device.type, CHUNK_ELEMENTS["cpu"])
    if group not in TOPK_GROUPS:
        raise ConfigError(f"topk_group: got {group!r}, allowed: {', '.join(TOPK_GROUPS)}")
    b, t, h, p = est.shape
    per_head = cells_per_query(geometry.visible, p, k)  # (B, T)
    budget = per_head if group == "head" else per_head * h
    starts, widths, counts = [], [], []
    step = max(1, chunk_elements // max(1, b * h * p))
    for c0 in range(0, t, step):
        c1 = min(t, c0 + step)
        # Query-major (C, B, ...): the flat cell list runs query by query, batch by batch, head by head.
        bounds = bin_bounds(geometry.visible[:, c0:c1], p).transpose(0, 1)  # (C, B, P + 1)
        empty = bounds[..., 1:] == bounds[..., :-1]
        score = est[:, c0:c1].detach().float().transpose(0, 1).masked_fill(empty[:, :, None], float("-inf"))
        flat = _select_chunk(score, budget[:, c0:c1].transpose(0, 1), group)  # (C, B, n)
        used = flat < h * p
        head, cell = (flat // p).clamp(max=h - 1), flat % p
        start = bounds.gather(-1, cell)
        width = bounds.gather(-1, cell + 1) - start
        starts.append(start[used])
        widths.append(width[used])
        counts.append(torch.zeros(c1 - c0, b, h, dtype=torch.long, device=est.device)
                      .scatter_add_(-1, head, used.long()))
    count = torch.cat(counts)  # (T, B, H)
    per_query = count.sum(-1).flatten()
    first = torch.cumsum(per_query, 0) - per_query  # (T B,): where each query's cells begin
    offsets = first.view(t, b, 1) + torch.cat([torch.zeros_like(count[..., :1]), count.cumsum(-1)], -1)
    width = torch.cat(widths)
    keys = width.clamp(max=k)
    key_sum = torch.cat([keys.new_zeros(1), keys.cumsum(0)])
    offsets = offsets.transpose(0, 1).contiguous()  # (B, T, H + 1)
    per_query_keys = key_sum[offsets[..., -1]] - key_sum[offsets[..., 0]]
    return SparseMask(torch.cat(starts).int(), width.int(), keys.int(), offsets,
                      int(per_query_keys.max()) if t else 0, int(per_query.max()) if t else 0)


def expand_cells(mask: SparseMask, c0: int, c1: int, slots: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys of queries [c0, c1): (rank, head, valid), each (B, C, R) with R = slots.

    Slot r of a query falls in the cell whose running key count passes r; key o of a cell of width w
    taking n keys has rank start + floor(o w / n) (all ranks when n = w, evenly spaced otherwise)."""
    slots = mask.slots if slots is None else slots
    offsets = mask.offsets[:, c0:c1]  # (B, C, H + 1)
    n_cells = max(mask.max_cells, 1)
    entry = offsets[..., :1] + torch.arange(n_cells, device=offsets.device)  # (B, C, Cc)
    real = entry < offsets[..., -1:]
    entry = torch.where(real, entry, 0)
    # Cell entry e belongs to head h when offsets[h] <= e < offsets[h + 1].
    cell_head = torch.searchsorted(offsets[..., 1:].contiguous(), entry, right=True).clamp(max=offsets.shape[-1] - 2)
    keys = torch.where(real, mask.cell_keys.long()[entry], 0) if len(mask.cell_keys) else entry * 0
    cum = keys.cumsum(-1)
    r = torch.arange(slots, device=keys.device).expand(*keys.shape[:2], slots).contiguous()
    idx = torch.searchsorted(cum.contiguous(), r, right=True)  # (B, C, R): the cell holding slot r
    valid = idx < keys.shape[-1]
    idx = idx.clamp(max=keys.shape[-1] - 1)
    taken = keys.gather(-1, idx)
    offset = r - (cum.gather(-1, idx) - taken)
    cells = entry.gather(-1, idx)
    width = mask.cell_width.long()[cells] if len(mask.cell_width) else cells * 0
    start = mask.cell_start.long()[cells] if len(mask.cell_start) else cells * 0
    rank = start + (offset * width) // taken.clamp_min(1)
    return torch.where(valid, rank, 0), cell_head.gather(-1, idx), valid


def positions(rank: torch.Tensor, geometry: KeyGeometry) -> torch.Tensor:
    """Key ranks (B, ...) -> key positions."""
    flat = rank.reshape(rank.shape[0], -1)
    return geometry.rank_to_pos.gather(1, flat).reshape(rank.shape)


def mask_to_dense(mask: SparseMask, geometry: KeyGeometry, heads: int) -> torch.Tensor:
    """(B, H, T, S) bool: the keys each query attends to. Quadratic: for tests and pictures only."""
    b, t = geometry.visible.shape
    s = geometry.rank_to_pos.shape[1]
    rank, head, valid = expand_cells(mask, 0, t)
    flat = torch.where(valid, head * s + positions(rank, geometry), heads * s)
    dense = torch.zeros(b, t, heads * s + 1, dtype=torch.bool, device=rank.device)
    dense.scatter_(2, flat, True)
    return dense[..., :-1].reshape(b, t, heads, s).transpose(1, 2)


def mask_density(mask: SparseMask, geometry: KeyGeometry, heads: int) -> torch.Tensor:
    """Mean over queries that see any key of (keys attended) / (heads x keys visible)."""
    seen = geometry.visible > 0
    key_sum = torch.cat([mask.cell_keys.new_zeros(1).long(), mask.cell_keys.long().cumsum(0)])
    attended = key_sum[mask.offsets[..., -1]] - key_sum[mask.offsets[..., 0]]
    used = attended.float() / (heads * geometry.visible.clamp_min(1)).float()
    return (used * seen).sum() / seen.sum().clamp_min(1)
