"""Dense float64 ground truth of each SEA stage, written from the definitions (T x S matrices, loops over
rows), independent of the linear-memory code it checks.

    performer_bin_mass_reference   Performer attention phi(q) . phi(k), normalised, summed into cells
    compressed_attention_reference softmax attention summed into cells (the estimation target)
    select_reference               grouped top-k over cells + expansion -> (B, H, T, S) bool mask
    sparse_attention_reference     softmax over the masked keys only
"""

from __future__ import annotations

import math

import torch

from attention.linear.features import performer_log_features
from attention.softmax.reference import attention_mask


def _visible(q, k, causal, key_mask):
    allowed = attention_mask(q.shape[1], k.shape[1], causal, key_mask, q.device)
    shape = (q.shape[0], 1, q.shape[1], k.shape[1])
    return torch.ones(shape, dtype=torch.bool) if allowed is None else allowed.expand(shape)  # (B, 1, T, S)


def _cells(visible: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, 1, T, S) bool -> cell of each visible key (B, 1, T, S), -1 elsewhere. Cell b of a row that
    sees L keys holds the visible keys of rank floor(b L / P) .. floor((b + 1) L / P) - 1."""
    rank = visible.long().cumsum(-1) - 1
    length = visible.long().sum(-1, keepdim=True)
    bounds = (torch.arange(1, bins + 1) * length[..., None]) // bins  # (B, 1, T, 1, P): upper bounds
    cell = (bounds <= rank[..., None]).long().sum(-1)  # cells whose upper bound is <= rank come before
    return torch.where(visible, cell, -1)


def _bin(probs: torch.Tensor, cells: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, H, T, S) probabilities, (B, 1, T, S) cells -> (B, T, H, P) mass per cell."""
    onehot = (cells[..., None] == torch.arange(bins)).to(probs.dtype)  # (B, 1, T, S, P)
    return torch.einsum("bhts,bhtsp->bthp", probs, onehot.expand(-1, probs.shape[1], -1, -1, -1))


def performer_bin_mass_reference(q, k, projection, bins, *, causal=False, key_mask=None):
    q, k, projection = q.double(), k.double(), projection.double()
    phi_q = torch.exp(performer_log_features(q, projection))  # (B, T, H, m)
    phi_k = torch.exp(performer_log_features(k, projection))
    visible = _visible(q, k, causal, key_mask)
    scores = torch.einsum("bthm,bshm->bhts", phi_q, phi_k) * visible
    probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-300)
    return _bin(probs, _cells(visible, bins), bins)


def compressed_attention_reference(q, k, bins, *, causal=False, key_mask=None):
    q, k = q.double(), k.double()
    visible = _visible(q, k, causal, key_mask)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return _bin(probs, _cells(visible, bins), bins)


def select_reference(est, k, group, *, s, causal=False, key_mask=None):
    """est (B, T, H, P) -> (B, H, T, S) bool: the keys each (query, head) attends to."""
    b, t, h, p = est.shape
    fake = torch.zeros(b, t, 1, 1)
    visible = _visible(fake, torch.zeros(b, s, 1, 1), causal, key_mask)[:, 0]  # (B, T, S)
    cells = _cells(visible[:, None], p)[:, 0]
    out = torch.zeros(b, h, t, s, dtype=torch.bool)
    for bi in range(b):
        for i in range(t):
            keys = visible[bi, i].nonzero()[:, 0]  # positions in rank order
            length = len(keys)
            if length == 0:
                continue
            nonempty = sorted(set(cells[bi, i, keys].tolist()))
            n = max(1, min(len(nonempty), (2 * k * len(nonempty) + length) // (2 * length)))
            score = {(hh, c): float(est[bi, i, hh, c]) for hh in range(h) for c in nonempty}
            if group == "head":
                chosen = [(hh, c) for hh in range(h)
                          for c in sorted(nonempty, key=lambda c, hh=hh: -score[(hh, c)])[:n]]
            else:
                for hh in range(h):  # each head's best cell first
                    best = max(nonempty, key=lambda c, hh=hh: score[(hh, c)])
                    score[(hh, best)] += 2.0
                chosen = sorted(score, key=lambda key: -score[key])[: h * n]
            for hh, c in chosen:
                members = keys[cells[bi, i, keys] == c]
                width = len(members)
                take = members if width <= k else members[[o * width // k for o in range(k)]]
                out[bi, hh, i, take] = True
    return out


def sparse_attention_reference(q, k, v, dense_mask, scale=None):
    """q: (B, T, H, D), k, v: (B, S, H, D), dense_mask: (B, H, T, S) bool -> (B, T, H, Dv) in float64;
    a row with no key gives zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~dense_mask, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", probs, v)
