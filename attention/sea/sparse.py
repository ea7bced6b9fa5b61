"""Sparse attention over a SEA mask, in time and memory linear in T, forward and backward.

For each query i and head h, softmax over the keys the mask lists (about k), nothing else:
    out_ih = sum_{j in K_ih} softmax_j(q_ih . k_jh * scale) v_jh,   lse_ih = logsumexp_j(...)
PyTorch path: queries in chunks; each chunk lists its keys (expand_cells), gathers them (B, C, R, D)
and reduces per (query, head) with scatter ops. The backward recomputes the chunk from (q, k, v, mask,
lse) as flash attention does, so what autograd keeps is O(T (H D + C)): no T x S tensor, no T x k x D
tensor. `backend` picks the Triton kernel (kernel.py) on CUDA.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from attention.backend import resolve
from attention.sea.geometry import KeyGeometry
from attention.sea.mask import SparseMask, expand_cells, positions

CHUNK_ELEMENTS = 2**22  # gathered key rows per chunk: B x C x R x D


def _gather_chunk(q, k, v, mask, geometry, c0, c1):
    """Keys of queries [c0, c1): slot head (B, C, R), key/value rows, the query row of each slot."""
    b, _, h, d = q.shape
    rank, head, valid = expand_cells(mask, c0, c1)
    flat = positions(rank, geometry) * h + head  # (B, C, R): row of (key, head) in (B, S H, D)
    idx = rearrange(flat, "b c r -> b (c r)")[..., None]
    k_sel = rearrange(rearrange(k, "b s h d -> b (s h) d").gather(1, idx.expand(-1, -1, d)),
                      "b (c r) d -> b c r d", c=c1 - c0)
    v_sel = rearrange(rearrange(v, "b s h d -> b (s h) d").gather(1, idx.expand(-1, -1, v.shape[-1])),
                      "b (c r) d -> b c r d", c=c1 - c0)
    q_sel = q[:, c0:c1].gather(2, head[..., None].expand(-1, -1, -1, d))  # (B, C, R, D)
    return head, valid, flat, k_sel, v_sel, q_sel


def _chunk_rows(q: torch.Tensor, mask: SparseMask) -> int:
    b, _, _, d = q.shape
    return max(1, CHUNK_ELEMENTS // max(1, b * max(mask.slots, 1) * d))


def _per_head_max(scores, head, heads):
    out = torch.full((*scores.shape[:2], heads), float("-inf"), dtype=scores.dtype, device=scores.device)
    return out.scatter_reduce(2, head, scores, "amax", include_self=True)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_tensors, slots, geometry, scale):
        mask = SparseMask(*mask_tensors, *slots)
        b, t, h, d = q.shape
        dtype = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(b, t, h, v.shape[-1], dtype=dtype, device=q.device)
        lse = torch.full((b, t, h), float("-inf"), dtype=dtype, device=q.device)
        step = _chunk_rows(q, mask)
        for c0 in range(0, t, step) if mask.slots else ():
            c1 = min(t, c0 + step)
            head, valid, _, k_sel, v_sel, q_sel = _gather_chunk(q, k, v, mask, geometry, c0, c1)
            scores = ((q_sel.to(dtype) * k_sel.to(dtype)).sum(-1) * scale).masked_fill(~valid, float("-inf"))
            top = _per_head_max(scores, head, h)  # (B, C, H)
            top = top.masked_fill(~torch.isfinite(top), 0.0)
            e = torch.exp(scores - top.gather(2, head))  # invalid slots: exp(-inf) = 0
            total = torch.zeros_like(top).scatter_add_(2, head, e)
            p = e / total.gather(2, head).clamp_min(torch.finfo(dtype).tiny)
            out[:, c0:c1] = torch.zeros_like(out[:, c0:c1]).scatter_add_(
                2, head[..., None].expand(-1, -1, -1, v.shape[-1]), p[..., None] * v_sel.to(dtype))
            lse[:, c0:c1] = torch.where(total > 0, top + torch.log(total), float("-inf"))
        ctx.save_for_backward(q, k, v, out, lse, *mask_tensors)
        ctx.slots, ctx.geometry, ctx.scale = slots, geometry, scale
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *mask_tensors = ctx.saved_tensors
        mask, geometry, scale = SparseMask(*mask_tensors, *ctx.slots), ctx.geometry, ctx.scale
        b, t, h, d = q.shape
        s, dv = k.shape[1], v.shape[-1]
        dtype = out.dtype
        grad_out = grad_out.to(dtype)
        dq = torch.zeros(b, t, h, d, dtype=dtype, device=q.device)
        dk = torch.zeros(b, s * h, d, dtype=dtype, device=q.device)
        dvv = torch.zeros(b, s * h, dv, dtype=dtype, device=q.device)
        delta = (grad_out * out).sum(-1)  # (B, T, H): sum_j p_j dp_j
        step = _chunk_rows(q, mask)
        for c0 in range(0, t, step) if mask.slots else ():
            c1 = min(t, c0 + step)
            head, valid, flat, k_sel, v_sel, q_sel = _gather_chunk(q, k, v, mask, geometry, c0, c1)
            k_sel, v_sel, q_sel = k_sel.to(dtype), v_sel.to(dtype), q_sel.to(dtype)
            scores = (q_sel * k_sel).sum(-1) * scale
            row_lse = lse[:, c0:c1].gather(2, head)
            p = torch.where(valid & torch.isfinite(row_lse), torch.exp(scores - row_lse), 0.0)  # (B, C, R)
            g_sel = grad_out[:, c0:c1].gather(2, head[..., None].expand(-1, -1, -1, dv))  # (B, C, R, Dv)
            dp = (g_sel * v_sel).sum(-1)
            ds = p * (dp - delta[:, c0:c1].gather(2, head))
            if grad_lse is not None:  # d lse / d s_j = p_j
                ds = ds + p * grad_lse[:, c0:c1].to(dtype).gather(2, head)
            dq[:, c0:c1] = torch.zeros_like(dq[:, c0:c1]).scatter_add_(
                2, head[..., None].expand(-1, -1, -1, d), ds[..., None] * k_sel * scale)
            rows = rearrange(flat, "b c r -> b (c r)")[..., None]
            dk.scatter_add_(1, rows.expand(-1, -1, d), rearrange(ds[..., None] * q_sel * scale, "b c r d -> b (c r) d"))
            dvv.scatter_add_(1, rows.expand(-1, -1, dv), rearrange(p[..., None] * g_sel, "b c r d -> b (c r) d"))
        dk = rearrange(dk, "b (s h) d -> b s h d", h=h).to(k.dtype)
        dvv = rearrange(dvv, "b (s h) d -> b s h d", h=h).to(v.dtype)
        return dq.to(q.dtype), dk, dvv, None, None, None, None


def sparse_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask,
                           geometry: KeyGeometry, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path: (out (B, T, H, Dv) in q's dtype, lse (B, T, H) float32+)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    tensors = (mask.cell_start, mask.cell_width, mask.cell_keys, mask.offsets)
    return _SparseAttention.apply(q, k, v, tensors, (mask.slots, mask.max_cells), geometry, scale)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask, geometry: KeyGeometry,
                     *, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """q: (B, T, H, D), k: (B, S, H, D), v: (B, S, H, Dv), the mask of select_cells -> (B, T, H, Dv).

    A (query, head) with no key gets zeros."""
    if resolve(backend, q) == "triton":
        from attention.sea.kernel import sparse_attention_triton

        return sparse_attention_triton(q, k, v, mask, geometry, scale=scale)
    return sparse_attention_torch(q, k, v, mask, geometry, scale)[0]
