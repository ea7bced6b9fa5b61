"""Triton kernels for sparse attention over a SEA mask (the PyTorch path in sparse.py is the reference).

One program per (query, batch x head). It walks its chosen cells (CSR offsets) and, inside each cell,
blocks of BLOCK_K keys (rank start + floor(o w / n), mapped to positions), with an online softmax: no
list of keys is ever materialised. Memory-bound gathers of k and v rows; O(T k D) work.
Backward: the same walk recomputes p = exp(s - lse); dq is the program's own row, dk and dv are
accumulated with atomic adds into float32 buffers (a key is shared by many queries).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attention.sea.geometry import KeyGeometry
from attention.sea.mask import SparseMask


@triton.jit
def _key_block(cell_start, cell_width, cell_keys, rank_to_pos, b, S, c, o0, BLOCK_K: tl.constexpr):
    start = tl.load(cell_start + c).to(tl.int64)
    width = tl.load(cell_width + c).to(tl.int64)
    n = tl.load(cell_keys + c).to(tl.int64)
    offs = o0 + tl.arange(0, BLOCK_K).to(tl.int64)
    ok = offs < n
    rank = start + (offs * width) // tl.maximum(n, 1)
    pos = tl.load(rank_to_pos + b * S + rank, mask=ok, other=0)
    return pos, ok


@triton.jit
def _sea_fwd(Q, K, V, O, LSE, cell_start, cell_width, cell_keys, offsets, rank_to_pos, scale, T, S,
             H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row = (b * T + t) * H + h  # (B, T, H, D) contiguous
    q = tl.load(Q + row * D + d, mask=d < D, other=0.0).to(tl.float32)
    c0 = tl.load(offsets + (b * T + t) * (H + 1) + h)  # offsets (B, T, H + 1)
    c1 = tl.load(offsets + (b * T + t) * (H + 1) + h + 1)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for c in range(c0, c1):
        n = tl.load(cell_keys + c)
        for o0 in range(0, n, BLOCK_K):
            pos, ok = _key_block(cell_start, cell_width, cell_keys, rank_to_pos, b, S, c, o0, BLOCK_K)
            kv_row = (b * S + pos) * H + h  # (BLOCK_K,)
            k = tl.load(K + kv_row[:, None] * D + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(V + kv_row[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
    has = l_i > 0
    out = tl.where(has, acc / tl.where(has, l_i, 1.0), 0.0)
    tl.store(O + row * DV + dv, out.to(O.dtype.element_ty), mask=dv < DV)
    tl.store(LSE + row, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")))


@triton.jit
def _sea_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DVV, cell_start, cell_width, cell_keys, offsets, rank_to_pos,
             scale, T, S, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row = (b * T + t) * H + h
    q = tl.load(Q + row * D + d, mask=d < D, other=0.0).to(tl.float32)
    do = tl.load(DO + row * DV + dv, mask=dv < DV, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row)
    delta = tl.load(DELTA + row)
    c0 = tl.load(offsets + (b * T + t) * (H + 1) + h)
    c1 = tl.load(offsets + (b * T + t) * (H + 1) + h + 1)
    dq = tl.zeros((BLOCK_D,), tl.float32)
    for c in range(c0, c1):
        n = tl.load(cell_keys + c)
        for o0 in range(0, n, BLOCK_K):
            pos, ok = _key_block(cell_start, cell_width, cell_keys, rank_to_pos, b, S, c, o0, BLOCK_K)
            kv_row = (b * S + pos) * H + h
            k_mask = ok[:, None] & (d[None, :] < D)
            v_mask = ok[:, None] & (dv[None, :] < DV)
            k = tl.load(K + kv_row[:, None] * D + d[None, :], mask=k_mask, other=0.0).to(tl.float32)
            v = tl.load(V + kv_row[:, None] * DV + dv[None, :], mask=v_mask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], 1) * scale
            p = tl.where(ok, tl.exp(s - lse), 0.0)
            dp = tl.sum(v * do[None, :], 1)
            ds = p * (dp - delta)
            dq += tl.sum(ds[:, None] * k, 0) * scale
            tl.atomic_add(DK + kv_row[:, None] * D + d[None, :], ds[:, None] * q[None, :] * scale, mask=k_mask)
            tl.atomic_add(DVV + kv_row[:, None] * DV + dv[None, :], p[:, None] * do[None, :], mask=v_mask)
    tl.store(DQ + row * D + d, dq.to(DQ.dtype.element_ty), mask=d < D)


def _launch_args(q, k, v, mask: SparseMask, geometry: KeyGeometry):
    b, t, h, d = q.shape
    dv = v.shape[-1]
    rank_to_pos = geometry.rank_to_pos.contiguous()
    cells = (mask.cell_start.contiguous(), mask.cell_width.contiguous(), mask.cell_keys.contiguous(),
             mask.offsets.contiguous(), rank_to_pos)
    meta = {"H": h, "D": d, "DV": dv, "BLOCK_D": triton.next_power_of_2(d),
            "BLOCK_DV": triton.next_power_of_2(dv), "BLOCK_K": 32}
    return (t, b * h), cells, meta


class _SparseAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_tensors, sizes, geometry, scale):
        mask = SparseMask(*mask_tensors, *sizes)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, t, h, _ = q.shape
        # NaN-filled: every row must be written by its program (zeros where a row has no key).
        out = torch.full((b, t, h, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
        lse = torch.full((b, t, h), float("nan"), dtype=torch.float32, device=q.device)
        grid, cells, meta = _launch_args(q, k, v, mask, geometry)
        if t and h and b:
            _sea_fwd[grid](q, k, v, out, lse, *cells, scale, t, k.shape[1], **meta)
        ctx.save_for_backward(q, k, v, out, lse, *mask_tensors, geometry.rank_to_pos)
        ctx.sizes, ctx.scale = sizes, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        *mask_tensors, rank_to_pos = rest
        mask = SparseMask(*mask_tensors, *ctx.sizes)
        geometry = KeyGeometry(None, rank_to_pos, 0)
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)  # (B, T, H)
        dq = torch.full_like(q, float("nan"))
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        grid, cells, meta = _launch_args(q, k, v, mask, geometry)
        if q.numel():
            _sea_bwd[grid](q, k, v, grad_out, lse, delta, dq, dk, dv, *cells, ctx.scale, q.shape[1], k.shape[1],
                           **meta)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask,
                            geometry: KeyGeometry, *, scale: float | None = None) -> torch.Tensor:
    """Same arguments and result as sparse.sparse_attention (out (B, T, H, Dv) in q's dtype)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    tensors = (mask.cell_start, mask.cell_width, mask.cell_keys, mask.offsets)
    return _SparseAttentionTriton.apply(q, k, v, tensors, (mask.slots, mask.max_cells), geometry, scale)


def sparse_attention_triton_with_lse(q, k, v, mask: SparseMask, geometry: KeyGeometry, scale: float | None = None):
    """Forward only, (out, lse): for tests against the PyTorch path's lse."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, t, h, _ = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.full((b, t, h, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, t, h), float("nan"), dtype=torch.float32, device=q.device)
    grid, cells, meta = _launch_args(q, k, v, mask, geometry)
    _sea_fwd[grid](q, k, v, out, lse, *cells, scale, t, k.shape[1], **meta)
    return out, lse
