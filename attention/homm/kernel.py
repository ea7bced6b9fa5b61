"""HoMM's moment mixing fused in Triton: from the two projections' pre-activations straight to the
mixed output, forward and backward, without the expanded moments, their running sums or the gates
ever stored per token. Same semantics as ops.homm_mix's PyTorch path:

    h = GELU(hidden)  (B, S, O * E) in O groups of E,   m^(o) = h^(1) * ... * h^(o)   (elementwise)
    M_t = sum_{s in V_t} m_s / max(n_t, 1)     V_t: real tokens (s <= t when causal), n_t = |V_t|
    y_t = sigmoid(select_t) * M_t              (B, T, O * E)

A program owns BLOCK_E columns e of one batch element, all O groups (the product couples the groups
column by column), and either a segment of tokens (causal: an online sum in registers, carried from
block to block; the segment's entering sums come from a first launch over the segments, as in the
linear attention kernel) or a block of tokens (non-causal: the mean is one vector per batch element).

Backward, with g = dL/dy and sigma = sigmoid(select):
    dselect_t = g_t * y_t * (1 - sigma_t)            (y = sigma M, so no M is needed: the output is saved)
    dm_s = [s real] * sum_{t: s in V_t} g_t sigma_t / max(n_t, 1)      (a reverse running sum when causal)
    the product chain, top down: G_O = dm^(O), G_o = dm^(o) + G_{o+1} h^(o+1), dh^(o) = G_o m^(o-1)
    dhidden = dh * GELU'(hidden)
ORDER is a compile-time constant, 1 to 4 (the groups are unrolled); higher orders run the PyTorch path.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ORDER = 4
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@dataclasses.dataclass(frozen=True)
class MomentTiles:
    """BLOCK_T tokens x BLOCK_E columns (of each group) per program step, warps; segments: programs
    along the sequence per (column block, batch element), None = by occupancy."""

    block_t: int = 64
    block_e: int = 64
    num_warps: int = 4
    segments: int | None = None

    def __post_init__(self):
        for name in ("block_t", "block_e"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MomentTiles.{name}: must be a power of two >= 16, got {value}")


@functools.cache
def default_tiles(order: int, interpret: bool) -> MomentTiles:
    """The backward keeps ~3 O tiles live (h, dm, the chain): 32 x 64 tiles with 4 warps keep them in
    registers up to order 4. The interpreter runs 16 x 16."""
    if interpret:
        return MomentTiles(16, 16, 4)
    return MomentTiles(32, 64, 4) if order > 2 else MomentTiles(64, 64, 4)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cut(length: int, block: int, programs: int, device: torch.device, forced: int | None) -> tuple[int, int]:
    """(n_seg, seg_len): segments of whole blocks, enough for two programs per multiprocessor, each
    over >= 4 blocks."""
    n_blocks = max(1, -(-length // block))
    if forced is not None:
        want = forced
    elif device.type == "cuda":
        want = max(1, min(-(-2 * _sm_count(device.index or 0) // programs), n_blocks // 4))
    else:
        want = 1
    seg_len = block * -(-n_blocks // min(want, n_blocks))
    return max(1, -(-length // seg_len)), seg_len


# -------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * SQRT1_2))  # exact (erf) GELU, as F.gelu


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.erf(x * SQRT1_2)) + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI


@triton.jit
def _tile(base, stride_t, offs_t, cols, end, col_ok):
    """(BLOCK_T, BLOCK_E) float32 of rows offs_t (< end) and columns cols (col_ok) of a (T, F) slice."""
    ptrs = base + offs_t.to(tl.int64)[:, None] * stride_t + cols[None, :]
    return tl.load(ptrs, mask=(offs_t[:, None] < end) & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(base, stride_t, offs_t, cols, end, col_ok, value):
    ptrs = base + offs_t.to(tl.int64)[:, None] * stride_t + cols[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(offs_t[:, None] < end) & col_ok[None, :])


@triton.jit
def _real(km_base, offs_t, end, HAS_KM: tl.constexpr):
    """(BLOCK_T,) float32: 1 for a real token inside the sequence, else 0."""
    keep = offs_t < end
    if HAS_KM:
        keep = keep & (tl.load(km_base + offs_t, mask=offs_t < end, other=0) != 0)
    return keep.to(tl.float32)


@triton.jit
def _mix_group(m, real, carry, inv_count, sel_base, y_base, sst, syt, offs_t, cols, end, col_ok,
               CAUSAL: tl.constexpr):
    """y = sigmoid(select) * (running) mean for one group's columns; returns the carry after the block."""
    m = m * real[:, None]
    if CAUSAL:
        total = tl.cumsum(m, 0) + carry[None, :]
    else:
        total = carry[None, :]
    gate = tl.sigmoid(_tile(sel_base, sst, offs_t, cols, end, col_ok))
    _store_tile(y_base, syt, offs_t, cols, end, col_ok, gate * total * inv_count[:, None])
    return carry + tl.sum(m, 0)


@triton.jit
def _gate_grads(g_base, sel_base, y_base, dsel_base, sgt, sst, syt, sdst, offs_t, cols, end, col_ok,
                STORE: tl.constexpr):
    """(g * sigmoid(select), one group's (BLOCK_T, BLOCK_E)); stores dselect = g y (1 - sigmoid) when STORE."""
    g = _tile(g_base, sgt, offs_t, cols, end, col_ok)
    gate = tl.sigmoid(_tile(sel_base, sst, offs_t, cols, end, col_ok))
    if STORE:
        y = _tile(y_base, syt, offs_t, cols, end, col_ok)
        _store_tile(dsel_base, sdst, offs_t, cols, end, col_ok, g * y * (1.0 - gate))
    return g * gate


@triton.jit
def _suffix(w, carry):
    """Inclusive reverse running sum along tokens, plus the carry from the blocks after: sum_{t' >= t} w_t'."""
    return carry[None, :] + tl.sum(w, 0)[None, :] - tl.cumsum(w, 0) + w


@triton.jit
def _hidden_grads(a_base, da_base, sat, sdat, offs_t, offs_e, E, end, col_ok, dm1, dm2, dm3, dm4,
                  ORDER: tl.constexpr):
    """dhidden of every group from dm^(1..ORDER) (dm_o unused above ORDER): recompute h, m, run the
    product chain top down, multiply by GELU'."""
    a1 = _tile(a_base, sat, offs_t, offs_e, end, col_ok)
    h1 = _gelu(a1)
    if ORDER >= 2:
        a2 = _tile(a_base, sat, offs_t, offs_e + E, end, col_ok)
        h2 = _gelu(a2)
    if ORDER >= 3:
        a3 = _tile(a_base, sat, offs_t, offs_e + 2 * E, end, col_ok)
        h3 = _gelu(a3)
        m2 = h1 * h2
    if ORDER >= 4:
        a4 = _tile(a_base, sat, offs_t, offs_e + 3 * E, end, col_ok)
        h4 = _gelu(a4)
        m3 = m2 * h3
    down = tl.zeros_like(h1)  # G_{o+1} h^(o+1), carried down the chain
    if ORDER >= 4:
        chain = dm4
        _store_tile(da_base, sdat, offs_t, offs_e + 3 * E, end, col_ok, chain * m3 * _gelu_grad(a4))
        down = chain * h4
    if ORDER >= 3:
        chain = dm3 + down
        _store_tile(da_base, sdat, offs_t, offs_e + 2 * E, end, col_ok, chain * m2 * _gelu_grad(a3))
        down = chain * h3
    if ORDER >= 2:
        chain = dm2 + down
        _store_tile(da_base, sdat, offs_t, offs_e + E, end, col_ok, chain * h1 * _gelu_grad(a2))
        down = chain * h2
    _store_tile(da_base, sdat, offs_t, offs_e, end, col_ok, (dm1 + down) * _gelu_grad(a1))


@triton.jit
def _segment_total(SUM, row0, first, last, stride, cols, col_ok, BLOCK_E: tl.constexpr):
    """Sum over segments first .. last - 1 of SUM[row0 + s, cols] (rows of `stride` floats), in segment
    order: the program adds up the segment sums itself (no prefix-sum launches on the host)."""
    acc = tl.zeros((BLOCK_E,), tl.float32)
    for s in range(first, last):
        acc += tl.load(SUM + (row0 + s) * stride + cols, mask=col_ok, other=0.0)
    return acc


@triton.jit
def _group_totals(SUM, row0, first, last, offs_e, E, col_ok, ORDER: tl.constexpr, BLOCK_E: tl.constexpr):
    """_segment_total for the columns offs_e of each group (zeros for the groups above ORDER)."""
    t1 = _segment_total(SUM, row0, first, last, ORDER * E, offs_e, col_ok, BLOCK_E)
    t2 = tl.zeros((BLOCK_E,), tl.float32)
    t3 = tl.zeros((BLOCK_E,), tl.float32)
    t4 = tl.zeros((BLOCK_E,), tl.float32)
    if ORDER >= 2:
        t2 = _segment_total(SUM, row0, first, last, ORDER * E, offs_e + E, col_ok, BLOCK_E)
    if ORDER >= 3:
        t3 = _segment_total(SUM, row0, first, last, ORDER * E, offs_e + 2 * E, col_ok, BLOCK_E)
    if ORDER >= 4:
        t4 = _segment_total(SUM, row0, first, last, ORDER * E, offs_e + 3 * E, col_ok, BLOCK_E)
    return t1, t2, t3, t4


@triton.jit
def _count_total(CNT, row0, first, last):
    """Sum of CNT[row0 + s] over segments first .. last - 1, a float32 scalar."""
    acc = tl.zeros((1,), tl.float32)
    for s in range(first, last):
        acc += tl.load(CNT + row0 + s + tl.arange(0, 1))
    return tl.sum(acc, 0)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _moment_sums_kernel(A, KM, SUM, CNT, sab, sat, L, E, seg_len, n_seg,
                        ORDER: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per (column block, segment, batch element): sum over the segment's real tokens of m^(o) for each
    group, into SUM (B, n_seg, O * E), and their number into CNT (B, n_seg)."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    seg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, L)
    col_ok = offs_e < E
    a_base = A + b * sab
    s1 = tl.zeros((BLOCK_E,), tl.float32)
    s2 = tl.zeros((BLOCK_E,), tl.float32)
    s3 = tl.zeros((BLOCK_E,), tl.float32)
    s4 = tl.zeros((BLOCK_E,), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        real = _real(KM + b * L, offs_t, end, HAS_KM)
        count += real
        m = _gelu(_tile(a_base, sat, offs_t, offs_e, end, col_ok))
        s1 += tl.sum(m * real[:, None], 0)
        if ORDER >= 2:
            m = m * _gelu(_tile(a_base, sat, offs_t, offs_e + E, end, col_ok))
            s2 += tl.sum(m * real[:, None], 0)
        if ORDER >= 3:
            m = m * _gelu(_tile(a_base, sat, offs_t, offs_e + 2 * E, end, col_ok))
            s3 += tl.sum(m * real[:, None], 0)
        if ORDER >= 4:
            m = m * _gelu(_tile(a_base, sat, offs_t, offs_e + 3 * E, end, col_ok))
            s4 += tl.sum(m * real[:, None], 0)
    row = b * n_seg + seg
    out = SUM + row * ORDER * E + offs_e
    tl.store(out, s1, mask=col_ok)
    if ORDER >= 2:
        tl.store(out + E, s2, mask=col_ok)
    if ORDER >= 3:
        tl.store(out + 2 * E, s3, mask=col_ok)
    if ORDER >= 4:
        tl.store(out + 3 * E, s4, mask=col_ok)
    if tl.program_id(0) == 0:
        tl.store(CNT + row, tl.sum(count, 0))


@triton.jit
def _moment_mix_kernel(A, SEL, KM, Y, SUM, CNT, CNT_END, sab, sat, ssb, sst, syb, syt, T, E, seg_len, n_seg,
                       CAUSAL: tl.constexpr, ORDER: tl.constexpr, HAS_KM: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Causal: grid (column blocks, n_seg, B), a segment's online sums starting from the sums of the
    segments before it (SUM (B, n_seg, O * E), CNT (B, n_seg) from _moment_sums_kernel; not read for
    segment 0); the real tokens up to the segment's end go to CNT_END (B, n_seg) for the backward.
    Non-causal: grid (column blocks, token blocks, B), seg_len = BLOCK_T, the totals over all n_seg
    context segments."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    seg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, T)
    col_ok = offs_e < E
    last = seg if CAUSAL else n_seg  # the context segments summed before the first token
    c1, c2, c3, c4 = _group_totals(SUM, b * n_seg, 0, last, offs_e, E, col_ok, ORDER, BLOCK_E)
    count = _count_total(CNT, b * n_seg, 0, last)
    a_base = A + b * sab
    sel_base = SEL + b * ssb
    y_base = Y + b * syb
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        if CAUSAL:
            real = _real(KM + b * T, offs_t, end, HAS_KM)
            inv_count = 1.0 / tl.maximum(tl.cumsum(real, 0) + count, 1.0)
            count += tl.sum(real, 0)
            m = _gelu(_tile(a_base, sat, offs_t, offs_e, end, col_ok))
        else:  # the totals are final: no moments to compute here
            real = tl.zeros((BLOCK_T,), tl.float32)
            inv_count = tl.zeros((BLOCK_T,), tl.float32) + 1.0 / tl.maximum(count, 1.0)
            m = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        c1 = _mix_group(m, real, c1, inv_count, sel_base, y_base, sst, syt, offs_t, offs_e, end, col_ok, CAUSAL)
        if ORDER >= 2:
            if CAUSAL:
                m = m * _gelu(_tile(a_base, sat, offs_t, offs_e + E, end, col_ok))
            c2 = _mix_group(m, real, c2, inv_count, sel_base, y_base, sst, syt, offs_t, offs_e + E, end, col_ok,
                            CAUSAL)
        if ORDER >= 3:
            if CAUSAL:
                m = m * _gelu(_tile(a_base, sat, offs_t, offs_e + 2 * E, end, col_ok))
            c3 = _mix_group(m, real, c3, inv_count, sel_base, y_base, sst, syt, offs_t, offs_e + 2 * E, end,
                            col_ok, CAUSAL)
        if ORDER >= 4:
            if CAUSAL:
                m = m * _gelu(_tile(a_base, sat, offs_t, offs_e + 3 * E, end, col_ok))
            c4 = _mix_group(m, real, c4, inv_count, sel_base, y_base, sst, syt, offs_t, offs_e + 3 * E, end,
                            col_ok, CAUSAL)
    if CAUSAL:
        if tl.program_id(0) == 0:
            tl.store(CNT_END + b * n_seg + seg, count)


@triton.jit
def _gate_sums_kernel(G, SEL, KM, DSUM, CNT, sgb, sgt, ssb, sst, T, E, seg_len, n_seg, n_seg_k,
                      CAUSAL: tl.constexpr, ORDER: tl.constexpr, HAS_KM: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per (column block, segment, b): sum over the segment's tokens t of g_t sigmoid(select_t) / max(n_t, 1),
    into DSUM (B, n_seg, O * E). CNT: causal, the forward's CNT_END (B, n_seg) (real tokens up to each
    segment's end); non-causal, the context segments' counts (B, n_seg_k), summed here."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    seg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, T)
    col_ok = offs_e < E
    if CAUSAL:  # the real tokens before the segment: up to the previous segment's end
        count = _count_total(CNT, b * n_seg + seg - 1, 0, tl.minimum(seg, 1))
    else:
        count = _count_total(CNT, b * n_seg_k, 0, n_seg_k)
    g_base = G + b * sgb
    sel_base = SEL + b * ssb
    for o in tl.static_range(ORDER):
        cols = offs_e + o * E
        acc = tl.zeros((BLOCK_E,), tl.float32)
        running = count
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            if CAUSAL:
                real = _real(KM + b * T, offs_t, end, HAS_KM)
                inv_count = 1.0 / tl.maximum(tl.cumsum(real, 0) + running, 1.0)
                running += tl.sum(real, 0)
            else:
                inv_count = tl.zeros((BLOCK_T,), tl.float32) + 1.0 / tl.maximum(count, 1.0)
            w = _gate_grads(g_base, sel_base, sel_base, sel_base, sgt, sst, sst, sst, offs_t, cols, end, col_ok,
                            False)
            acc += tl.sum(w * inv_count[:, None], 0)
        tl.store(DSUM + (b * n_seg + seg) * ORDER * E + cols, acc, mask=col_ok)


@triton.jit
def _moment_bwd_causal_kernel(A, SEL, Y, G, KM, DA, DSEL, DSUM, CNT_END,
                              sab, sat, ssb, sst, syb, syt, sgb, sgt, sdab, sdat, sdsb, sdst, T, E, seg_len, n_seg,
                              ORDER: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_E: tl.constexpr):
    """Grid (column blocks, n_seg, B): the segment's blocks from the last, reverse running sums of
    g sigma / n carried from block to block, starting from the later segments' sums (DSUM (B, n_seg, O * E)
    from _gate_sums_kernel; not read for the last segment), then dselect and dhidden. CNT_END (B, n_seg):
    the real tokens up to each segment's end."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    seg = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, T)
    col_ok = offs_e < E
    row = b * n_seg + seg
    r1, r2, r3, r4 = _group_totals(DSUM, b * n_seg, seg + 1, n_seg, offs_e, E, col_ok, ORDER, BLOCK_E)
    before = tl.load(CNT_END + row)  # real tokens before the current block (all of them, to start)
    a_base, da_base = A + b * sab, DA + b * sdab
    sel_base, y_base, g_base, dsel_base = SEL + b * ssb, Y + b * syb, G + b * sgb, DSEL + b * sdsb
    n_blocks = tl.cdiv(end - start, BLOCK_T)
    for i in range(0, n_blocks):
        offs_t = start + (n_blocks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        real = _real(KM + b * T, offs_t, end, HAS_KM)
        before -= tl.sum(real, 0)
        inv_count = 1.0 / tl.maximum(before + tl.cumsum(real, 0), 1.0)  # 1 / n_t
        w = _gate_grads(g_base, sel_base, y_base, dsel_base, sgt, sst, syt, sdst, offs_t, offs_e, end, col_ok,
                        True) * inv_count[:, None]
        dm1 = _suffix(w, r1) * real[:, None]
        r1 += tl.sum(w, 0)
        dm2 = dm1
        dm3 = dm1
        dm4 = dm1
        if ORDER >= 2:
            w = _gate_grads(g_base, sel_base, y_base, dsel_base, sgt, sst, syt, sdst, offs_t, offs_e + E, end,
                            col_ok, True) * inv_count[:, None]
            dm2 = _suffix(w, r2) * real[:, None]
            r2 += tl.sum(w, 0)
        if ORDER >= 3:
            w = _gate_grads(g_base, sel_base, y_base, dsel_base, sgt, sst, syt, sdst, offs_t, offs_e + 2 * E, end,
                            col_ok, True) * inv_count[:, None]
            dm3 = _suffix(w, r3) * real[:, None]
            r3 += tl.sum(w, 0)
        if ORDER >= 4:
            w = _gate_grads(g_base, sel_base, y_base, dsel_base, sgt, sst, syt, sdst, offs_t, offs_e + 3 * E, end,
                            col_ok, True) * inv_count[:, None]
            dm4 = _suffix(w, r4) * real[:, None]
            r4 += tl.sum(w, 0)
        _hidden_grads(a_base, da_base, sat, sdat, offs_t, offs_e, E, end, col_ok, dm1, dm2, dm3, dm4, ORDER)


@triton.jit
def _moment_bwd_noncausal_kernel(A, SEL, Y, G, KM, DA, DSEL, DSUM,
                                 sab, sat, ssb, sst, syb, syt, sgb, sgt, sdab, sdat, sdsb, sdst, T, S, E, n_seg,
                                 ORDER: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_T: tl.constexpr,
                                 BLOCK_E: tl.constexpr):
    """Grid (column blocks, token blocks, 2 B): even axis-2 programs write dselect of query tokens,
    odd ones dhidden of context tokens from dm (the mean's gradient: the sum of the n_seg query segments'
    DSUM (B, n_seg, O * E)) on real tokens."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = (tl.program_id(2) // 2).to(tl.int64)
    col_ok = offs_e < E
    if tl.program_id(2) % 2 == 0:
        for o in tl.static_range(ORDER):
            _gate_grads(G + b * sgb, SEL + b * ssb, Y + b * syb, DSEL + b * sdsb, sgt, sst, syt, sdst, offs_t,
                        offs_e + o * E, T, col_ok, True)
    else:
        real = _real(KM + b * S, offs_t, S, HAS_KM)[:, None]
        t1, t2, t3, t4 = _group_totals(DSUM, b * n_seg, 0, n_seg, offs_e, E, col_ok, ORDER, BLOCK_E)
        dm1, dm2, dm3, dm4 = t1[None, :] * real, t2[None, :] * real, t3[None, :] * real, t4[None, :] * real
        _hidden_grads(A + b * sab, DA + b * sdab, sat, sdat, offs_t, offs_e, E, S, col_ok, dm1, dm2, dm3, dm4,
                      ORDER)


# --------------------------------------------------------------------------------------------- host


def _meta(tiles: MomentTiles, order: int, km) -> dict:
    return dict(ORDER=order, HAS_KM=km is not None, BLOCK_T=tiles.block_t, BLOCK_E=tiles.block_e,
                num_warps=tiles.num_warps)


def _rows(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def moment_forward(hidden, select, km, order: int, causal: bool, tiles: MomentTiles):
    """y (B, T, O * E) contiguous in select's dtype, and for the backward: causal, the real tokens up to
    each segment's end (B, n_seg); non-causal, the context segments' real tokens (B, n_seg); and the cut."""
    b, s_len, f = hidden.shape
    t, e = select.shape[1], f // order
    dev = hidden.device
    y = torch.empty((b, t, f), dtype=select.dtype, device=dev)
    n_e = triton.cdiv(e, tiles.block_e)
    meta = _meta(tiles, order, km)
    km_arg = km if km is not None else hidden
    n_seg, seg_len = _cut(s_len, tiles.block_t, n_e * b, dev, tiles.segments)
    sums = torch.empty((b, n_seg, f), dtype=torch.float32, device=dev)
    count = torch.empty((b, n_seg), dtype=torch.float32, device=dev)
    if n_seg > 1 or not causal:  # one causal segment starts from nothing
        _moment_sums_kernel[(n_e, n_seg, b)](hidden, km_arg, sums, count, *_rows(hidden), s_len, e, seg_len, n_seg,
                                             **meta)
    if causal:
        count_end = torch.empty((b, n_seg), dtype=torch.float32, device=dev)
        _moment_mix_kernel[(n_e, n_seg, b)](hidden, select, km_arg, y, sums, count, count_end, *_rows(hidden),
                                            *_rows(select), *_rows(y), t, e, seg_len, n_seg, CAUSAL=True, **meta)
        return y, count_end, (n_seg, seg_len)
    _moment_mix_kernel[(n_e, triton.cdiv(t, tiles.block_t), b)](
        hidden, select, km_arg, y, sums, count, count, *_rows(hidden), *_rows(select), *_rows(y), t, e,
        tiles.block_t, n_seg, CAUSAL=False, **meta)
    return y, count, (n_seg, seg_len)


def moment_backward(hidden, select, km, y, grad, order: int, causal: bool, tiles: MomentTiles, counts, cut):
    """(dhidden, dselect) contiguous, in hidden's and select's dtypes."""
    b, s_len, f = hidden.shape
    t, e = select.shape[1], f // order
    dev = hidden.device
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)
    d_select = torch.empty(select.shape, dtype=select.dtype, device=dev)
    n_e = triton.cdiv(e, tiles.block_e)
    meta = _meta(tiles, order, km)
    km_arg = km if km is not None else hidden
    strides = (*_rows(hidden), *_rows(select), *_rows(y), *_rows(grad), *_rows(d_hidden), *_rows(d_select))
    n_seg_k, _ = cut
    n_seg, seg_len = cut if causal else _cut(t, tiles.block_t, n_e * b, dev, tiles.segments)
    dsum = torch.empty((b, n_seg, f), dtype=torch.float32, device=dev)
    if n_seg > 1 or not causal:
        _gate_sums_kernel[(n_e, n_seg, b)](grad, select, km_arg, dsum, counts, *_rows(grad), *_rows(select), t, e,
                                           seg_len, n_seg, n_seg_k, CAUSAL=causal, **meta)
    if causal:
        _moment_bwd_causal_kernel[(n_e, n_seg, b)](hidden, select, y, grad, km_arg, d_hidden, d_select, dsum,
                                                   counts, *strides, t, e, seg_len, n_seg, **meta)
    else:
        grid = (n_e, triton.cdiv(max(t, s_len), tiles.block_t), 2 * b)
        _moment_bwd_noncausal_kernel[grid](hidden, select, y, grad, km_arg, d_hidden, d_select, dsum, *strides,
                                           t, s_len, e, n_seg, **meta)
    return d_hidden, d_select


class MomentMixFunction(torch.autograd.Function):
    """hidden (B, S, O * E), select (B, T, O * E) of one dtype, last dim contiguous; key_mask (B, S) uint8."""

    @staticmethod
    def forward(ctx, hidden, select, key_mask, order, causal, tiles):
        y, counts, cut = moment_forward(hidden, select, key_mask, order, causal, tiles)
        ctx.save_for_backward(hidden, select, key_mask, y, counts)
        ctx.args = (order, causal, tiles, cut)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, select, key_mask, y, counts = ctx.saved_tensors
        order, causal, tiles, cut = ctx.args
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        d_hidden, d_select = moment_backward(hidden, select, key_mask, y, grad, order, causal, tiles, counts, cut)
        return d_hidden, d_select, None, None, None, None


def compute_dtype(hidden: torch.Tensor, select: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, select.dtype)


def kernel_supports(hidden: torch.Tensor, select: torch.Tensor, order: int) -> bool:
    """Whether homm_mix_triton takes these inputs (backend='auto' falls back to PyTorch if not)."""
    return 1 <= order <= MAX_ORDER and compute_dtype(hidden, select) in KERNEL_DTYPES


def homm_mix_triton(hidden: torch.Tensor, select: torch.Tensor, order: int, *, causal: bool = False,
                    key_mask: torch.Tensor | None = None, tiles: MomentTiles | None = None) -> torch.Tensor:
    """sigmoid(select) * mean of expand_moments(GELU(hidden), order): same semantics as ops.homm_mix.

    hidden: (B, S, O * E) pre-activations of the moment projection, select: (B, T, O * E) pre-sigmoid
    gates, key_mask: (B, S) bool (True = real token); causal needs S == T. Computed in float32 from
    float16/bfloat16/float32 inputs (autocast's dtype under autocast); returns (B, T, O * E) contiguous
    in that dtype."""
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order: the Triton kernel takes 1 to {MAX_ORDER}, got {order}; use backend='reference'")
    if hidden.dim() != 3 or select.dim() != 3 or hidden.shape[0] != select.shape[0] \
            or hidden.shape[2] != select.shape[2] or hidden.shape[2] % order:
        raise ValueError(f"hidden (B, S, F), select (B, T, F) with F a multiple of order {order}: got "
                         f"{tuple(hidden.shape)} and {tuple(select.shape)}")
    if causal and hidden.shape[1] != select.shape[1]:
        raise ValueError(f"causal moment mixing needs as many context tokens as queries, got "
                         f"{hidden.shape[1]} for {select.shape[1]}")
    dtype = compute_dtype(hidden, select)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"hidden, select: dtypes {hidden.dtype}, {select.dtype} (compute dtype {dtype}); allowed: "
                        "float16, bfloat16, float32")
    hidden, select = (x.to(dtype) if x.stride(-1) == 1 else x.to(dtype).contiguous() for x in (hidden, select))
    if key_mask is not None:
        if key_mask.shape != hidden.shape[:2]:
            raise ValueError(f"key_mask: expected shape {tuple(hidden.shape[:2])}, got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(torch.bool).contiguous().view(torch.uint8)
    if tiles is None:
        tiles = default_tiles(order, os.environ.get("TRITON_INTERPRET", "0") == "1")
    return MomentMixFunction.apply(hidden, select, key_mask, order, causal, tiles)
