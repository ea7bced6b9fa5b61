"""Fused local (sliding-window) attention in Triton, forward and backward: no (T, W) score tensor.

Same semantics as reference.local_attention_reference. With win(p) = p // W, query i sees key j iff

    win(i) - look_backward <= win(j) <= win(i) + look_forward,  j <= i if causal,  j < T,  key_mask[b, j]

so query i's keys are the band [lo_i, hi_i) = [(win(i) - lb) W, (win(i) + lf + 1) W) clipped to [0, T)
(and to i + 1 when causal), minus the masked keys. A program owns BLOCK_M queries of one (batch, head)
and streams only the key blocks of the union of its rows' bands, flash-attention style (online
softmax in base 2, fp32 accumulators); per row it keeps lse2 = log2 sum_j 2^(s_j log2 e), +inf for a
row that sees no key (its output is zero, and exp2(s - lse2) = 0 in the backward).

Backward, two launches, no atomics (deterministic):
  dq kernel   per query block, the forward's key range: delta_i = sum_d dO_id O_id (stored for the next
              launch), p = exp2(s - lse2), ds = p (dO.v - delta), dq = scale * sum_j ds_ij k_j
  dk/dv kernel per key block, over the queries that can see it: win(i) in [win(j) - lf, win(j) + lb],
              i >= j when causal; dv = sum_i p_ij dO_i, dk = scale * sum_i ds_ij q_i

Inputs are read through their strides: q, k, v may be views (e.g. slices of a fused qkv projection)
as long as the head dimension is contiguous (stride 1); anything else is copied once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl

from attention.triton_helpers import batch_head

LOG2E = tl.constexpr(1.4426950408889634)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128



@dataclasses.dataclass(frozen=True)
class Tile:
    """One kernel's launch shape: BLOCK_M queries x BLOCK_N keys per program step, warps, and software
    pipelining stages (None: Triton's default)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):  # tl.dot needs every dimension >= 16 on a GPU
                raise ValueError(f"Tile.{name}: must be a power of two >= 16, got {value}")


@dataclasses.dataclass(frozen=True)
class LocalTiles:
    """Tiles of the forward, the dq and the dk/dv kernels."""

    fwd: Tile = Tile()
    dq: Tile = Tile()
    dkv: Tile = Tile()


@functools.cache  # called every forward: keep the host side of a launch short
def default_tiles(dtype: torch.dtype, head_dim: int, interpret: bool) -> LocalTiles:
    """64 x 64 tiles: with W = 64 and look 1/1 a query block of 64 needs exactly three key blocks (a
    128-row block would need four for twice the rows, but wastes a quarter of its pairs at the edges).
    fp32 uses exact (FMA) dot products: smaller tiles keep registers. The interpreter runs 16 x 16."""
    if interpret:
        t = Tile(16, 16, 4)
        return LocalTiles(t, t, t)
    if dtype == torch.float32:
        t = Tile(32, 32, 4)
        return LocalTiles(t, t, t)
    if head_dim > 64:  # two (64, 128) fp32 accumulators (dk, dv) would spill at 4 warps
        return LocalTiles(Tile(64, 64, 4), Tile(64, 64, 8), Tile(64, 64, 8))
    return LocalTiles(Tile(64, 64, 4), Tile(64, 64, 4), Tile(64, 64, 4))


# ------------------------------------------------------------------------------------------ index helpers


@triton.jit
def _query_bands(offs_m, T, W, LOOK_BACK, LOOK_FWD, CAUSAL: tl.constexpr):
    """Per query row, the key band [lo, hi) it may see before the key mask; empty for rows >= T."""
    win = offs_m // W
    lo = tl.maximum((win - LOOK_BACK) * W, 0)
    hi = tl.minimum((win + LOOK_FWD + 1) * W, T)
    if CAUSAL:
        hi = tl.minimum(hi, offs_m + 1)
    hi = tl.where(offs_m < T, hi, 0)
    return lo, hi


@triton.jit
def _key_range(m0, T, W, LOOK_BACK, LOOK_FWD, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """[lo, hi): the union of the bands of queries m0 .. m0 + BLOCK_M - 1 (the band ends are monotone in i)."""
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    lo = tl.maximum((m0 // W - LOOK_BACK) * W, 0)
    hi = tl.minimum((m_last // W + LOOK_FWD + 1) * W, T)
    if CAUSAL:
        hi = tl.minimum(hi, m_last + 1)
    return lo, hi


@triton.jit
def _query_range(n0, T, W, LOOK_BACK, LOOK_FWD, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the queries that may see a key of n0 .. n0 + BLOCK_N - 1: win(i) in
    [win(j) - look_forward, win(j) + look_backward], and i >= j when causal."""
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    lo = tl.maximum((n0 // W - LOOK_FWD) * W, 0)
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    hi = tl.minimum((n_last // W + LOOK_BACK + 1) * W, T)
    return lo, hi


@triton.jit
def _load_rows(base, stride, offs, offs_d, end, D: tl.constexpr):
    """(len(offs), BLOCK_D) rows of a (T, D) slice with row stride `stride`; zeros past `end` and D."""
    ptrs = base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :]
    return tl.load(ptrs, mask=(offs[:, None] < end) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(base, stride, offs, offs_d, end, value, D: tl.constexpr):
    ptrs = base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(offs[:, None] < end) & (offs_d[None, :] < D))


@triton.jit
def _key_tile(q, k_base, v_base, km_base, skt, svt, n0, offs_d, hi, band_lo, band_hi, qk_scale2,
              HAS_KM: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N - 1 against a block of queries: k and v (zeros past `hi`), the scores in
    base-2 units, and which (query, key) pairs are visible (in the query's band, and a real key)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, skt, offs_n, offs_d, hi, D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(v_base, svt, offs_n, offs_d, hi, D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2  # (BLOCK_M, BLOCK_N)
    vis = (offs_n[None, :] >= band_lo[:, None]) & (offs_n[None, :] < band_hi[:, None])
    if HAS_KM:
        vis = vis & (tl.load(km_base + offs_n, mask=offs_n < hi, other=0) != 0)[None, :]
    return k, v, s, vis


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _local_fwd_kernel(Q, K, V, KM, O, LSE2,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                      T, H, W, LOOK_BACK, LOOK_FWD, qk_scale2,
                      CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, sqt, offs_m, offs_d, T, D)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    km_base = KM + b * T
    band_lo, band_hi = _query_bands(offs_m, T, W, LOOK_BACK, LOOK_FWD, CAUSAL)
    lo, hi = _key_range(m0, T, W, LOOK_BACK, LOOK_FWD, CAUSAL, BLOCK_M)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of s (base-2 units)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k, v, s, vis = _key_tile(q, k_base, v_base, km_base, skt, svt, n0, offs_d, hi, band_lo, band_hi,
                                 qk_scale2, HAS_KM, D, BLOCK_N, PRECISION)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet: no NaN
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # a row with no visible key: acc = 0, so zeros
    _store_rows(O + b * sob + h * soh, sot, offs_m, offs_d, T, out, D)
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE2 + bh.to(tl.int64) * T + offs_m, lse2, mask=offs_m < T)


# --------------------------------------------------------------------------------------------- backward


@triton.jit
def _local_bwd_dq_kernel(Q, K, V, KM, O, DO, DQ, LSE2, DELTA,
                         sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sdb, sdt, sdh,
                         T, H, W, LOOK_BACK, LOOK_FWD, qk_scale2, scale,
                         CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dq of BLOCK_M queries; also writes delta = rowsum(dO * O) of its rows for the dk/dv launch.
    DQ has the layout of O (strides sob, sot, soh)."""
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q = _load_rows(Q + b * sqb + h * sqh, sqt, offs_m, offs_d, T, D)
    do = _load_rows(DO + b * sdb + h * sdh, sdt, offs_m, offs_d, T, D)
    o = _load_rows(O + b * sob + h * soh, sot, offs_m, offs_d, T, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
    rows = bh.to(tl.int64) * T + offs_m
    tl.store(DELTA + rows, delta, mask=row_ok)
    lse2 = tl.load(LSE2 + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    km_base = KM + b * T
    band_lo, band_hi = _query_bands(offs_m, T, W, LOOK_BACK, LOOK_FWD, CAUSAL)
    lo, hi = _key_range(m0, T, W, LOOK_BACK, LOOK_FWD, CAUSAL, BLOCK_M)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k, v, s, vis = _key_tile(q, k_base, v_base, km_base, skt, svt, n0, offs_d, hi, band_lo, band_hi,
                                 qk_scale2, HAS_KM, D, BLOCK_N, PRECISION)
        p = tl.math.exp2(tl.where(vis, s - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ + b * sob + h * soh, sot, offs_m, offs_d, T, dq * scale, D)


@triton.jit
def _local_bwd_dkdv_kernel(Q, K, V, KM, DO, DK, DV, LSE2, DELTA,
                           sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sdb, sdt, sdh,
                           T, H, W, LOOK_BACK, LOOK_FWD, qk_scale2, scale,
                           CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of BLOCK_N keys, summed over the query blocks that can see them; tiles are transposed
    (keys on rows) so no (BLOCK_M, BLOCK_N) tile is ever transposed. DK, DV have O's layout."""
    pid_n = tl.program_id(0)
    bh, b, h = batch_head(H)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + h * skh, skt, offs_n, offs_d, T, D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + b * svb + h * svh, svt, offs_n, offs_d, T, D)
    if HAS_KM:
        key_real = tl.load(KM + b * T + offs_n, mask=offs_n < T, other=0) != 0
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    stat_base = bh.to(tl.int64) * T
    lo, hi = _query_range(n0, T, W, LOOK_BACK, LOOK_FWD, CAUSAL, BLOCK_N)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, sqt, offs_m, offs_d, hi, D)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_base, sdt, offs_m, offs_d, hi, D)
        lse2 = tl.load(LSE2 + stat_base + offs_m, mask=offs_m < hi, other=0.0)
        delta = tl.load(DELTA + stat_base + offs_m, mask=offs_m < hi, other=0.0)
        band_lo, band_hi = _query_bands(offs_m, T, W, LOOK_BACK, LOOK_FWD, CAUSAL)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2  # (BLOCK_N, BLOCK_M)
        vis_t = (offs_n[:, None] >= band_lo[None, :]) & (offs_n[:, None] < band_hi[None, :])
        if HAS_KM:
            vis_t = vis_t & key_real[:, None]
        p_t = tl.math.exp2(tl.where(vis_t, s_t - lse2[None, :], float("-inf")))
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    _store_rows(DK + b * sob + h * soh, sot, offs_n, offs_d, T, dk * scale, D)
    _store_rows(DV + b * sob + h * soh, sot, offs_n, offs_d, T, dv, D)


# ------------------------------------------------------------------------------------------------- host


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _meta(tile: Tile, d: int, causal: bool, has_km: bool, dtype: torch.dtype) -> dict:
    stages = {} if tile.num_stages is None else {"num_stages": tile.num_stages}
    return dict(CAUSAL=causal, HAS_KM=has_km, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps, **stages,
                # fp32 inputs: exact products, as the PyTorch path computes them (tf32 would cost ~1e-3)
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def local_forward(q, k, v, km, window, look_backward, look_forward, causal, scale, tiles: LocalTiles):
    """out (B, T, H, D) contiguous in q's dtype and lse2 (B*H, T) float32. km: (B, T) uint8 or None."""
    b, t, h, d = q.shape
    out = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((b * h, t), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(t, tiles.fwd.block_m), b * h)
    _local_fwd_kernel[grid](q, k, v, km if km is not None else q, out, lse2,
                            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                            t, h, window, look_backward, look_forward, scale * 1.4426950408889634,
                            **_meta(tiles.fwd, d, causal, km is not None, q.dtype))
    return out, lse2


def local_backward(q, k, v, km, out, lse2, grad_out, window, look_backward, look_forward, causal, scale,
                   tiles: LocalTiles):
    """(dq, dk, dv), each (B, T, H, D) contiguous in q's dtype. Two launches: dq (+ delta), then dk/dv."""
    b, t, h, d = q.shape
    dq, dk, dv = (torch.empty((b, t, h, d), dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty((b * h, t), dtype=torch.float32, device=q.device)
    km_arg = km if km is not None else q
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out),
            t, h, window, look_backward, look_forward, scale * 1.4426950408889634, scale)
    _local_bwd_dq_kernel[(triton.cdiv(t, tiles.dq.block_m), b * h)](
        q, k, v, km_arg, out, grad_out, dq, lse2, delta, *args, **_meta(tiles.dq, d, causal, km is not None, q.dtype))
    _local_bwd_dkdv_kernel[(triton.cdiv(t, tiles.dkv.block_n), b * h)](
        q, k, v, km_arg, grad_out, dk, dv, lse2, delta, *args,
        **_meta(tiles.dkv, d, causal, km is not None, q.dtype))
    return dq, dk, dv


class LocalAttentionFunction(torch.autograd.Function):
    """q, k, v of one dtype, head dimension contiguous; key_mask (B, T) uint8 or None."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, window, look_backward, look_forward, causal, scale, tiles):
        out, lse2 = local_forward(q, k, v, key_mask, window, look_backward, look_forward, causal, scale, tiles)
        ctx.save_for_backward(q, k, v, key_mask, out, lse2)
        ctx.args = (window, look_backward, look_forward, causal, scale, tiles)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, key_mask, out, lse2 = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = local_backward(q, k, v, key_mask, out, lse2, grad_out, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The dtype the kernel runs in: autocast's on q's device when it is on (as a matmul would), else
    the common dtype of q, k, v."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether local_attention_triton takes these inputs (backend='auto' falls back to PyTorch if not)."""
    return compute_dtype(q, k, v) in KERNEL_DTYPES and q.shape[-1] <= MAX_HEAD_DIM


def local_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int,
                           look_backward: int = 1, look_forward: int = 0, causal: bool = False,
                           key_mask: torch.Tensor | None = None, scale: float | None = None,
                           tiles: LocalTiles | None = None) -> torch.Tensor:
    """Same semantics as local_attention_reference. q, k, v: (B, T, H, D), D <= 128, any strides with a
    contiguous head dimension (others are copied); computed in compute_dtype (float16, bfloat16 or
    float32; autocast's dtype under autocast) with fp32 accumulation; returns (B, T, H, D) contiguous
    in that dtype; gradients reach q, k, v in their own dtypes. key_mask: (B, T) bool, True = real."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"local attention is self-attention: q, k, v must all be (B, T, H, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if window_size < 1 or look_backward < 0 or look_forward < 0:
        raise ValueError(f"window_size >= 1, look_backward >= 0, look_forward >= 0 needed; got "
                         f"{window_size}, {look_backward}, {look_forward}")
    bsz, t, h, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim: the Triton kernel takes D <= {MAX_HEAD_DIM}, got {d}; use backend='reference'")
    dtype = compute_dtype(q, k, v)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"q, k, v: dtypes {q.dtype}, {k.dtype}, {v.dtype} (compute dtype {dtype}); allowed: "
                        "float16, bfloat16, float32")
    # .to() is a no-op at the same dtype; under autocast, autograd casts the gradients back.
    q, k, v = (x.to(dtype) if x.stride(-1) == 1 else x.to(dtype).contiguous() for x in (q, k, v))
    if key_mask is not None:
        if key_mask.shape != (bsz, t):
            raise ValueError(f"key_mask: expected shape ({bsz}, {t}), got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(torch.bool).contiguous().view(torch.uint8)  # no copy for a contiguous bool
    n_windows = -(-t // window_size)
    # beyond the number of windows a look changes nothing; clipping keeps the kernel's int32 index math small
    look_backward, look_forward = min(look_backward, n_windows), min(look_forward, n_windows)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if tiles is None:
        tiles = default_tiles(dtype, d, os.environ.get("TRITON_INTERPRET", "0") == "1")
    return LocalAttentionFunction.apply(q, k, v, key_mask, window_size, look_backward, look_forward, causal,
                                        float(scale), tiles)
