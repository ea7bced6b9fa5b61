"""Linear attention in Triton: the causal chunked scan (state passed between chunks inside the kernel),
the non-causal form and the recurrent decoding step, with the feature map (elu + 1, relu, identity)
fused into the loads. Same semantics as reference.linear_attention_reference; equations and the
derivation of the backward in README.md.

Per (batch, head), phi_q, phi_k: (T, F) features (F = D), v: (T, Dv), chunks of C tokens:

    causal forward, chunk n with state (S, z) = (sum phi_k^T v, sum phi_k) of the tokens before it
        A   = (phi_q phi_k^T) * tril                                   (C, C), never leaves registers
        num = A v + phi_q S,  den = rowsum(A) + phi_q z,  out = num / max(den, eps)
        S += phi_k^T v,  z += colsum(phi_k)                            (F, Dv) fp32 in registers
    non-causal: S, z summed over all keys once, then out = phi_q S / max(phi_q z, eps) per query block.

Parallelism beyond batch x heads: the sequence is cut into segments of whole chunks, one program each.
A first launch sums each segment's (phi_k^T v, phi_k) (_state_sums_kernel, (B*H, n_seg, F, Dv) float32);
each segment's scan then adds up the sums of the segments before it itself, so a causal forward is two
launches (one for a single segment) and the forward keeps out, den (B*H, T) float32 and the n_seg
segment sums per (b, h), never a (T, F, Dv) or per-chunk state tensor. The backward (kernel_bwd.py)
restarts from the same segment sums. Launches matter: on the GPU machine cutting the forward from 8
launches to 2 saved ~0.4 ms at T = 1k, ~70 us of host time a launch (docs/benchmarks.md).

Inputs are read through their strides (q, k, v may be views of a fused projection) as long as the
head dimension is contiguous; outputs are contiguous. Dots take float32 operands: exact ("ieee") for
float32 inputs; tf32 for bfloat16 inputs (features are computed in float32 and not rounded back to 16
bits), with the dq pass's cancelling products in tf32x3 (three tf32 products, about float32); float16
inputs (11-bit mantissa, as tf32's) use tf32x3 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from attention.triton_helpers import batch_head

FEATURE_CODES = {"identity": 0, "elu": 1, "relu": 2}  # the FEATURE constexpr of every kernel
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Tile:
    """One kernel's launch shape: CHUNK tokens per step (the causal chunk C), warps, pipelining stages
    (None: Triton's default)."""

    chunk: int = 64
    num_warps: int = 4
    num_stages: int | None = None

    def __post_init__(self):
        if self.chunk < 16 or self.chunk & (self.chunk - 1):  # tl.dot needs every dimension >= 16 on a GPU
            raise ValueError(f"Tile.chunk: must be a power of two >= 16, got {self.chunk}")


@dataclasses.dataclass(frozen=True)
class LinearTiles:
    """Tiles of the forward scan / apply kernels, the segment sums and the backward kernels. The causal
    chunk of the forward and the backward must be equal (the backward restarts from the forward's
    segment states). segments: programs per (b, h) along the sequence, None = by occupancy
    (num_segments)."""

    fwd: Tile = Tile()
    sums: Tile = Tile()
    bwd: Tile = Tile()
    segments: int | None = None

    def __post_init__(self):
        if self.fwd.chunk != self.bwd.chunk or self.sums.chunk != self.fwd.chunk:
            raise ValueError(f"LinearTiles: one chunk size for all kernels, got {self.fwd.chunk}, "
                             f"{self.sums.chunk}, {self.bwd.chunk}")
        if self.segments is not None and self.segments < 1:
            raise ValueError(f"LinearTiles.segments: must be >= 1 or None, got {self.segments}")


@functools.cache  # called every forward: keep the host side of a launch short
def default_tiles(dtype: torch.dtype, head_dim: int, interpret: bool) -> LinearTiles:
    """Chunks of 64 at D <= 64; at D = 128 the (F, Dv) float32 state alone is 64 KiB of registers, so
    chunks of 32 and 8 warps. The interpreter runs chunks of 16."""
    if interpret:
        t = Tile(16, 4)
        return LinearTiles(t, t, t)
    if head_dim > 64 and dtype != torch.float32:
        # bf16 at D = 128 with Triton's default pipelining asked for 246 KiB of shared memory on an H200,
        # which has 227 KiB a block: fewer stages
        return LinearTiles(Tile(32, 8, 2), Tile(32, 4, 2), Tile(32, 8, 1))
    if head_dim > 64 or dtype == torch.float32:
        return LinearTiles(Tile(32, 8), Tile(32, 4), Tile(32, 8))
    return LinearTiles(Tile(64, 4), Tile(64, 4), Tile(64, 8))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_segments(n_chunks: int, programs_per_segment: int, device: torch.device, min_chunks: int = 4) -> int:
    """Segments per (b, h): enough programs for two per multiprocessor, each scanning >= min_chunks
    chunks (fewer would spend more on the segment sums than the scan saves). 1 off the GPU."""
    if device.type != "cuda":
        return 1
    want = -(-2 * _sm_count(device.index or 0) // programs_per_segment)
    return max(1, min(want, n_chunks // min_chunks))


# -------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _rows(base, stride, offs, offs_d, end, D: tl.constexpr):
    """(len(offs), BLOCK) float32 rows of a (T, D) slice with row stride `stride`; zeros past `end`, D."""
    ptrs = base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :]
    return tl.load(ptrs, mask=(offs[:, None] < end) & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base, stride, offs, offs_d, end, value, D: tl.constexpr):
    ptrs = base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(offs[:, None] < end) & (offs_d[None, :] < D))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b of float32 operands with float32 accumulation at PRECISION ('ieee', 'tf32' or 'tf32x3')."""
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dot_exact(a, b, PRECISION: tl.constexpr):
    """a @ b where the result cancels (dq): tf32x3 in place of tf32, else as _dot."""
    if PRECISION == "tf32":
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _phi(x, keep, FEATURE: tl.constexpr):
    """phi(x) elementwise, zero where not `keep`: rows past the end, padded keys, and the padded feature
    columns (phi(0) = 1 for elu + 1, so a zero-loaded column must be cleared explicitly)."""
    if FEATURE == 1:  # elu(x) + 1 = x + 1 (x > 0), exp(x) (x <= 0)
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return tl.where(keep, y, 0.0)


@triton.jit
def _phi_grad(x, FEATURE: tl.constexpr):
    """dphi/dx elementwise (as torch's elu and relu backward: relu'(0) = 0)."""
    if FEATURE == 1:
        g = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        g = tl.where(x > 0, 1.0, 0.0)
    else:
        g = x * 0.0 + 1.0
    return g


@triton.jit
def _feature_rows(base, stride, offs, offs_d, end, keep_rows, FEATURE: tl.constexpr, D: tl.constexpr):
    """phi of rows offs of a (T, D) slice: (len(offs), BLOCK_D) float32, zero outside keep_rows and D."""
    x = _rows(base, stride, offs, offs_d, end, D)
    keep = keep_rows[:, None] & (offs[:, None] < end) & (offs_d[None, :] < D)
    return _phi(x, keep, FEATURE)


@triton.jit
def _key_keep(km_base, offs, end, HAS_KM: tl.constexpr):
    """(len(offs),) bool: a real key (key_mask True) inside the sequence."""
    keep = offs < end
    if HAS_KM:
        keep = keep & (tl.load(km_base + offs, mask=offs < end, other=0) != 0)
    return keep


@triton.jit
def _scaled_grads(do_base, sdt, den_base, offs, offs_v, end, eps, DV: tl.constexpr):
    """For out = num / max(den, eps) and g = dL/dout rows: gn = g / max(den, eps), the gradient reaching
    num ((len(offs), BLOCK_DV)), and den (1 past `end`, where g is 0)."""
    do = _rows(do_base, sdt, offs, offs_v, end, DV)
    den = tl.load(den_base + offs, mask=offs < end, other=1.0)
    return do / tl.maximum(den, eps)[:, None], den


@triton.jit
def _query_grads(do_base, sdt, o_base, sot, den_base, offs, offs_v, end, eps, DV: tl.constexpr):
    """(gn, gd): gn as _scaled_grads, gd = -(g . out) / den = -(gn . out) where den >= eps, else 0, the
    gradient reaching den, from the stored output (rounded to the input dtype: fine for dk, dv and the
    reverse state; dq recomputes gn . num exactly, see kernel_bwd.py). Rows past `end`: zeros."""
    gn, den = _scaled_grads(do_base, sdt, den_base, offs, offs_v, end, eps, DV)
    o = _rows(o_base, sot, offs, offs_v, end, DV)
    return gn, tl.where(den >= eps, -tl.sum(gn * o, 1), 0.0)


@triton.jit
def _state_offsets(offs_d, offs_v, BLOCK_DV: tl.constexpr):
    """Offsets of a (BLOCK_D, BLOCK_DV) state stored padded and contiguous."""
    return offs_d[:, None] * BLOCK_DV + offs_v[None, :]


@triton.jit
def _summed_states(sum_s, sum_z, row0, first, last, offs_d, offs_v, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """(S, z): the sum of segment sums first .. last - 1 of one (b, h) (rows row0 + s of SUM_S (.., BLOCK_D,
    BLOCK_DV), SUM_Z (.., BLOCK_D)), in segment order; zeros for an empty range. Adding the segments up
    here, not as a prefix sum on the host, saves launches; and never subtracting (cumsum - x) keeps a
    query that sees no key (gn = g / eps, ~1e6 g) from leaving rounding error in every other state."""
    state = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    z = tl.zeros((BLOCK_D,), tl.float32)
    offsets = _state_offsets(offs_d, offs_v, BLOCK_DV)
    for s in range(first, last):
        row = row0 + s
        state += tl.load(sum_s + row * BLOCK_D * BLOCK_DV + offsets)
        z += tl.load(sum_z + row * BLOCK_D + offs_d)
    return state, z


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _state_sums_kernel(X, W, KM, O, DEN, SUM_S, SUM_Z,
                       sxb, sxt, sxh, swb, swt, swh, sob, sot, soh,
                       L, H, seg_len, n_seg, eps,
                       QUERY_GRADS: tl.constexpr, FEATURE: tl.constexpr, HAS_KM: tl.constexpr,
                       D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """One segment of one (b, h): SUM_S = sum_t phi(x_t) w_t^T (BLOCK_D, BLOCK_DV), SUM_Z = sum_t phi(x_t) c_t.

    keys (QUERY_GRADS False): x = k, w = v, c = 1, padded keys left out: the forward's state.
    queries (QUERY_GRADS True): x = q, w = gn, c = gd (_query_grads from W = dO, O, DEN): the backward's
    reverse state. Stored at row (b*h) * n_seg + segment of SUM_S (.., BLOCK_D, BLOCK_DV) float32."""
    seg = tl.program_id(0)
    bh, b, h = batch_head(H)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, L)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    x_base = X + b * sxb + h * sxh
    w_base = W + b * swb + h * swh
    acc_s = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    acc_z = tl.zeros((BLOCK_D,), tl.float32)
    for c0 in range(start, end, CHUNK):
        offs_t = c0 + offs_c
        if QUERY_GRADS:
            phi = _feature_rows(x_base, sxt, offs_t, offs_d, end, offs_t < end, FEATURE, D)
            w, c = _query_grads(w_base, swt, O + b * sob + h * soh, sot, DEN + bh.to(tl.int64) * L, offs_t,
                                offs_v, end, eps, DV)
            acc_z += tl.sum(phi * c[:, None], 0)
        else:
            keep = _key_keep(KM + b * L, offs_t, end, HAS_KM)
            phi = _feature_rows(x_base, sxt, offs_t, offs_d, end, keep, FEATURE, D)
            w = _rows(w_base, swt, offs_t, offs_v, end, DV)
            acc_z += tl.sum(phi, 0)
        acc_s += _dot(tl.trans(phi), w, PRECISION)  # (BLOCK_D, C) x (C, BLOCK_DV)
    row = bh.to(tl.int64) * n_seg + seg
    tl.store(SUM_S + row * BLOCK_D * BLOCK_DV + _state_offsets(offs_d, offs_v, BLOCK_DV), acc_s)
    tl.store(SUM_Z + row * BLOCK_D + offs_d, acc_z)


@triton.jit
def _causal_fwd_kernel(Q, K, V, KM, O, DEN, SUM_S, SUM_Z,
                       sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                       T, H, seg_len, n_seg, eps,
                       FEATURE: tl.constexpr, HAS_KM: tl.constexpr,
                       D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """One segment of one (b, h), chunk by chunk from the state entering the segment: the sum of the
    earlier segments' sums (SUM_S, SUM_Z from _state_sums_kernel; not read for segment 0). Writes out
    and den (DEN (B*H, T))."""
    seg = tl.program_id(0)
    bh, b, h = batch_head(H)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, T)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    den_base = DEN + bh.to(tl.int64) * T
    state, z = _summed_states(SUM_S, SUM_Z, bh.to(tl.int64) * n_seg, 0, seg, offs_d, offs_v, BLOCK_D, BLOCK_DV)
    causal = offs_c[:, None] >= offs_c[None, :]  # (query c, key s): s <= c
    for c0 in range(start, end, CHUNK):
        offs_t = c0 + offs_c
        phi_q = _feature_rows(q_base, sqt, offs_t, offs_d, end, offs_t < end, FEATURE, D)  # (C, BLOCK_D)
        keep = _key_keep(KM + b * T, offs_t, end, HAS_KM)
        phi_k = _feature_rows(k_base, skt, offs_t, offs_d, end, keep, FEATURE, D)
        v = _rows(v_base, svt, offs_t, offs_v, end, DV)  # (C, BLOCK_DV)
        scores = _dot(phi_q, tl.trans(phi_k), PRECISION)  # (C, C)
        scores = tl.where(causal, scores, 0.0)
        num = _dot(scores, v, PRECISION) + _dot(phi_q, state, PRECISION)
        den = tl.sum(scores, 1) + tl.sum(phi_q * z[None, :], 1)
        _store_rows(o_base, sot, offs_t, offs_v, end, num / tl.maximum(den, eps)[:, None], DV)
        tl.store(den_base + offs_t, den, mask=offs_t < end)
        state += _dot(tl.trans(phi_k), v, PRECISION)
        z += tl.sum(phi_k, 0)


@triton.jit
def _apply_state_kernel(Q, SUM_S, SUM_Z, O, DEN, sqb, sqt, sqh, sob, sot, soh, T, H, seg_len, n_seg_k, eps,
                        FEATURE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """Non-causal: one segment of queries of one (b, h) against the (S, z) of all its keys (the sum of
    the n_seg_k key segments' sums, added up once per program)."""
    bh, b, h = batch_head(H)
    start = tl.program_id(0) * seg_len
    end = tl.minimum(start + seg_len, T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    state, z = _summed_states(SUM_S, SUM_Z, bh.to(tl.int64) * n_seg_k, 0, n_seg_k, offs_d, offs_v, BLOCK_D,
                              BLOCK_DV)
    q_base = Q + b * sqb + h * sqh
    o_base = O + b * sob + h * soh
    for c0 in range(start, end, CHUNK):
        offs_t = c0 + tl.arange(0, CHUNK)
        phi_q = _feature_rows(q_base, sqt, offs_t, offs_d, end, offs_t < end, FEATURE, D)
        num = _dot(phi_q, state, PRECISION)
        den = tl.sum(phi_q * z[None, :], 1)
        _store_rows(o_base, sot, offs_t, offs_v, end, num / tl.maximum(den, eps)[:, None], DV)
        tl.store(DEN + bh.to(tl.int64) * T + offs_t, den, mask=offs_t < end)


@triton.jit
def _step_kernel(Q, K, V, S_IN, Z_IN, S_OUT, Z_OUT, O,
                 sqb, sqh, skb, skh, svb, svh, ssb, ssh, ssf, szb, szh, H, eps,
                 FEATURE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    """One decoding step of one (b, h): S' = S + phi(k) v^T, z' = z + phi(k), out = phi(q) S' / max(phi(q) z', eps).
    S_OUT, Z_OUT, O contiguous: (B, H, F, Dv), (B, H, F), (B, H, Dv)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    in_d = offs_d < D
    in_v = offs_v < DV
    phi_q = _phi(tl.load(Q + b * sqb + h * sqh + offs_d, mask=in_d, other=0.0).to(tl.float32), in_d, FEATURE)
    phi_k = _phi(tl.load(K + b * skb + h * skh + offs_d, mask=in_d, other=0.0).to(tl.float32), in_d, FEATURE)
    v = tl.load(V + b * svb + h * svh + offs_v, mask=in_v, other=0.0).to(tl.float32)
    in_s = in_d[:, None] & in_v[None, :]
    state = tl.load(S_IN + b * ssb + h * ssh + offs_d[:, None] * ssf + offs_v[None, :], mask=in_s, other=0.0)
    z = tl.load(Z_IN + b * szb + h * szh + offs_d, mask=in_d, other=0.0)
    state = state + phi_k[:, None] * v[None, :]
    z = z + phi_k
    num = tl.sum(phi_q[:, None] * state, 0)  # (BLOCK_DV,)
    den = tl.sum(phi_q * z, 0)
    tl.store(S_OUT + bh.to(tl.int64) * D * DV + offs_d[:, None] * DV + offs_v[None, :], state, mask=in_s)
    tl.store(Z_OUT + bh.to(tl.int64) * D + offs_d, z, mask=in_d)
    tl.store(O + bh.to(tl.int64) * DV + offs_v, (num / tl.maximum(den, eps)).to(O.dtype.element_ty), mask=in_v)


# --------------------------------------------------------------------------------------------- host


def strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' PRECISION: float32 inputs exact ('ieee', as the PyTorch path computes them); bfloat16
    tf32 (its 8-bit mantissa rounds far more than tf32's 11); float16 tf32x3 (its 11 bits are tf32's)."""
    return {torch.float32: "ieee", torch.bfloat16: "tf32"}.get(dtype, "tf32x3")


def launch_meta(tile: Tile, d: int, dv: int, feature: int, dtype: torch.dtype) -> dict:
    stages = {} if tile.num_stages is None else {"num_stages": tile.num_stages}
    return dict(FEATURE=feature, D=d, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BLOCK_DV=max(16, triton.next_power_of_2(dv)), CHUNK=tile.chunk, num_warps=tile.num_warps,
                PRECISION=dot_precision(dtype), **stages)


@dataclasses.dataclass
class Segments:
    """How a sequence of `length` tokens is cut: n_seg segments of seg_len tokens (whole chunks)."""

    n_seg: int
    seg_len: int

    @classmethod
    def cut(cls, length: int, chunk: int, programs: int, device: torch.device, forced: int | None,
            most: int) -> Segments:
        """At most `most` segments: a causal scan adds up the earlier segments' sums (O(n_seg^2) small
        loads per (b, h)); a non-causal program adds up all of them."""
        n_chunks = max(1, -(-length // chunk))
        want = forced if forced is not None else min(most, num_segments(n_chunks, programs, device))
        seg_len = chunk * -(-n_chunks // max(1, min(want, n_chunks)))
        return cls(max(1, -(-length // seg_len)), seg_len)


MOST_SEGMENTS = {True: 64, False: 16}  # causal, non-causal


def state_sums(x, w, km, o, den, length, segments: Segments, feature, eps, tiles: LinearTiles, query_grads):
    """(S, z) per segment: ((B*H, n_seg, BLOCK_D, BLOCK_DV), (B*H, n_seg, BLOCK_D)) float32; see
    _state_sums_kernel. x: (B, L, H, D); w: v (keys) or dO (queries, with o and den)."""
    b, _, h, d = x.shape
    dv = w.shape[-1]
    meta = launch_meta(tiles.sums, d, dv, feature, x.dtype)
    sum_s = torch.empty((b * h, segments.n_seg, meta["BLOCK_D"], meta["BLOCK_DV"]), dtype=torch.float32,
                        device=x.device)
    sum_z = torch.empty((b * h, segments.n_seg, meta["BLOCK_D"]), dtype=torch.float32, device=x.device)
    o_arg = o if o is not None else w
    _state_sums_kernel[(segments.n_seg, b * h)](
        x, w, km if km is not None else x, o_arg, den if den is not None else sum_z, sum_s, sum_z,
        *strides3(x), *strides3(w), *strides3(o_arg), length, h, segments.seg_len, segments.n_seg, eps,
        QUERY_GRADS=query_grads, HAS_KM=km is not None, **meta)
    return sum_s, sum_z


def linear_forward(q, k, v, km, causal: bool, feature: int, eps: float, tiles: LinearTiles):
    """out (B, T, H, Dv) contiguous in q's dtype, den (B*H, T) float32, the key segments' sums (None
    for a causal single segment) and the cuts of keys and queries, which the backward restarts from."""
    b, t, h, d = q.shape
    s_len, dv = k.shape[1], v.shape[-1]
    out = torch.empty((b, t, h, dv), dtype=q.dtype, device=q.device)
    den = torch.empty((b * h, t), dtype=torch.float32, device=q.device)
    meta = launch_meta(tiles.fwd, d, dv, feature, q.dtype)
    chunk = tiles.fwd.chunk
    most = MOST_SEGMENTS[causal]
    keys = Segments.cut(s_len, chunk, b * h, q.device, tiles.segments, most)
    queries = keys if causal else Segments.cut(t, chunk, b * h, q.device, tiles.segments, most)
    sum_s = sum_z = None
    if keys.n_seg > 1 or not causal:
        sum_s, sum_z = state_sums(k, v, km, None, None, s_len, keys, feature, eps, tiles, False)
    if causal:
        _causal_fwd_kernel[(keys.n_seg, b * h)](
            q, k, v, km if km is not None else q, out, den, sum_s if sum_s is not None else den,
            sum_z if sum_z is not None else den, *strides3(q), *strides3(k), *strides3(v), *strides3(out),
            t, h, keys.seg_len, keys.n_seg, eps, HAS_KM=km is not None, **meta)
    else:
        _apply_state_kernel[(queries.n_seg, b * h)](
            q, sum_s, sum_z, out, den, *strides3(q), *strides3(out), t, h, queries.seg_len, keys.n_seg, eps, **meta)
    return out, den, (sum_s, sum_z), (keys, queries)


class LinearAttentionFunction(torch.autograd.Function):
    """q, k, v of one dtype, head dimension contiguous; key_mask (B, S) uint8 or None."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal, feature, eps, tiles):
        out, den, (sum_s, sum_z), cuts = linear_forward(q, k, v, key_mask, causal, feature, eps, tiles)
        ctx.save_for_backward(q, k, v, key_mask, out, den, sum_s, sum_z)
        ctx.args = (causal, feature, eps, tiles, cuts)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        from attention.linear.kernel_bwd import linear_backward

        q, k, v, key_mask, out, den, sum_s, sum_z = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = linear_backward(q, k, v, key_mask, out, den, sum_s, sum_z, grad_out, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype the kernel runs in: autocast's on the inputs' device when it is on (as a matmul
    would), else the common dtype of the inputs."""
    dev = xs[0].device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str) -> bool:
    """Whether linear_attention_triton takes these inputs (backend='auto' falls back to PyTorch if not)."""
    return (feature_map in FEATURE_CODES and compute_dtype(q, k, v) in KERNEL_DTYPES
            and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM)


def _checked_feature(feature_map: str) -> int:
    if feature_map not in FEATURE_CODES:
        raise ValueError(f"feature_map: the Triton kernel takes {', '.join(FEATURE_CODES)}, got {feature_map!r}; "
                         "Performer features run on the PyTorch path (backend='reference')")
    return FEATURE_CODES[feature_map]


def _checked_dtype(*xs: torch.Tensor) -> torch.dtype:
    dtype = compute_dtype(*xs)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"inputs: dtypes {', '.join(str(x.dtype) for x in xs)} (compute dtype {dtype}); "
                        "allowed: float16, bfloat16, float32")
    return dtype


def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                            feature_map: str = "elu", key_mask: torch.Tensor | None = None, eps: float = 1e-6,
                            tiles: LinearTiles | None = None) -> torch.Tensor:
    """Same semantics as linear_attention_reference for feature_map 'elu', 'relu' or 'identity'.

    q: (B, T, H, D), k: (B, S, H, D), v: (B, S, H, Dv), D, Dv <= 128, any strides with a contiguous last
    dimension (others are copied); key_mask (B, S) bool, True = real key; causal needs S == T. Computed
    in compute_dtype (float16, bfloat16 or float32; autocast's under autocast) with float32 features,
    states and accumulation; returns (B, T, H, Dv) contiguous in that dtype."""
    feature = _checked_feature(feature_map)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected (B, T, H, D) tensors, got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    bsz, t, h, d = q.shape
    s = k.shape[1]
    if k.shape != (bsz, s, h, d) or v.shape[:3] != (bsz, s, h):
        raise ValueError(f"k, v: expected (B, S, H, D) = ({bsz}, S, {h}, {d}) and (B, S, H, Dv), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if causal and s != t:
        raise ValueError(f"causal linear attention needs as many keys as queries, got {s} keys for {t} queries")
    if max(d, v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims: the Triton kernel takes D, Dv <= {MAX_HEAD_DIM}, got {d}, {v.shape[-1]}; "
                         "use backend='reference'")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    dtype = _checked_dtype(q, k, v)
    # .to() is a no-op at the same dtype; under autocast, autograd casts the gradients back.
    q, k, v = (x.to(dtype) if x.stride(-1) == 1 else x.to(dtype).contiguous() for x in (q, k, v))
    if key_mask is not None:
        if key_mask.shape != (bsz, s):
            raise ValueError(f"key_mask: expected shape ({bsz}, {s}), got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(torch.bool).contiguous().view(torch.uint8)  # no copy for a contiguous bool
    if tiles is None:
        tiles = default_tiles(dtype, max(d, v.shape[-1]), os.environ.get("TRITON_INTERPRET", "0") == "1")
    return LinearAttentionFunction.apply(q, k, v, key_mask, causal, feature, float(eps), tiles)


def linear_step_triton(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state_s: torch.Tensor,
                       state_z: torch.Tensor, *, feature_map: str = "elu", eps: float = 1e-6):
    """One decoding step without autograd: q_t, k_t (B, H, D), v_t (B, H, Dv), state S (B, H, D, Dv) and
    z (B, H, D) float32 -> (out_t (B, H, Dv) in q_t's dtype, new S, new z). Same as
    chunked.linear_attention_step for elu, relu, identity."""
    feature = _checked_feature(feature_map)
    bsz, h, d = q_t.shape
    dv = v_t.shape[-1]
    if state_s.shape != (bsz, h, d, dv) or state_z.shape != (bsz, h, d) or state_s.dtype != torch.float32:
        raise ValueError(f"state: expected float32 S ({bsz}, {h}, {d}, {dv}) and z ({bsz}, {h}, {d}), got "
                         f"{state_s.dtype} {tuple(state_s.shape)} and {tuple(state_z.shape)}")
    _checked_dtype(q_t, k_t, v_t)
    q_t, k_t, v_t = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_t, k_t, v_t))
    if state_s.stride(-1) != 1 or state_z.stride(-1) != 1:
        state_s, state_z = state_s.contiguous(), state_z.contiguous()
    new_s = torch.empty((bsz, h, d, dv), dtype=torch.float32, device=q_t.device)
    new_z = torch.empty((bsz, h, d), dtype=torch.float32, device=q_t.device)
    out = torch.empty((bsz, h, dv), dtype=q_t.dtype, device=q_t.device)
    _step_kernel[(bsz * h,)](q_t, k_t, v_t, state_s, state_z, new_s, new_z, out,
                             q_t.stride(0), q_t.stride(1), k_t.stride(0), k_t.stride(1), v_t.stride(0), v_t.stride(1),
                             state_s.stride(0), state_s.stride(1), state_s.stride(2), state_z.stride(0),
                             state_z.stride(1), h, float(eps), FEATURE=feature, D=d, DV=dv,
                             BLOCK_D=max(16, triton.next_power_of_2(d)),
                             BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    return out, new_s, new_z
