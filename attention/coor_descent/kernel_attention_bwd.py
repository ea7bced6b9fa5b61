"""Backward of the fused coordinate-descent attention (forward in kernel_attention.py).

Exact gradient of the unrolled iterations, recomputed per (BLOCK_M, BLOCK_N) tile from q, k and the
per-row scalars the forward kept (a_t, lse_t, P_t; y_sum): no (T, S) tensor. With Z_i = sum_j y_ij,
Zc = max(Z, 1e-6), delta_i = dO_i . out_i (0 where Z < 1e-6: the clamp passes no gradient):

    g_ij       = (dO_i . v_j - delta_i) / Zc_i                           dL/dy_ij
    abar_{n-1} = sum_j g_ij y_ij [s_ij + a_{n-1} <= 0] / eps_f           prepass, one sweep over keys
    abar_{t-1} = abar_t P_t                                              per row, in the prepass
    ds_ij      = g_ij y_ij [unsat] / eps_f - sum_{t>=1} abar_t exp(s_ij/eps_t - lse_t) [s_ij + a_{t-1} <= 0]
    dq = scale ds k,  dk = scale ds^T q,  dv = (y / Zc)^T dO

The sum over t would cost one exp per iteration per (i, j). Over the iterations G = [t_c, n) that share
one eps_c (all of them without decay; those at the floor with decay) it factors per row:

    sum_{t in G} abar_t exp(s/eps_c - lse_t) [s <= thr_t] = exp((min(s, R) - R)/eps_c) sum_{t in G} w_t [s <= thr_t]
    R = max_{t in G} thr_t,  w_t = abar_t exp(R/eps_c - lse_t)

one exp and a compare-and-add per iteration. It is exact in real arithmetic; in float32 it needs
R/eps_c - lse_t <= 60 (terms that underflow are then < e^-27 of abar_t) and no overflow of w_t. The
prepass checks that per row; a tile with any row outside it takes the one-exp-per-iteration path
(cfg["exp_limit"], default 60; tests set it below any value to force that path).
dq (programs over query blocks) and dk/dv (programs over key blocks) both recompute ds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention.coor_descent.kernel_attention import (
    LOG2E,
    key_range_end,
    launch_meta,
    load_key_tile,
    unmasked_key_end,
    visible_tile,
)
from attention.triton_helpers import batch_head


@triton.jit
def _prepass_step(q, do, k_base, v_base, sks, svs, n0, offs_m, offs_d, T, S, km_ptr, thr, cf, delta, acc,
                  CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, MASKED: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kt = load_key_tile(k_base, sks, offs_n, offs_d, S, D, BLOCK_D, MASKED, True)
    vt = load_key_tile(v_base, svs, offs_n, offs_d, S, D, BLOCK_D, MASKED, True)
    qk = tl.dot(q, kt, input_precision=PRECISION)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    unsat = qk <= thr[:, None]
    if MASKED:
        unsat = unsat & visible_tile(offs_m, offs_n, T, S, km_ptr, CAUSAL, HAS_KM)
    y = tl.where(unsat, tl.math.exp2((tl.minimum(qk, thr[:, None]) - thr[:, None]) * cf), 0.0)
    return acc + tl.sum((dp - delta[:, None]) * y, 1)


@triton.jit
def _attn_backward_prepass_kernel(Q, K, V, KM, O, DO, STATS, ROWS, EPS, RB, ABAR, W,
                                  sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh,
                                  T, S, H, n_iters, t_c, scale, exp_limit,
                                  CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr,
                                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    md = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=md, other=0.0)
    do = tl.load(DO + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=md, other=0.0)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=md, other=0.0)
    y_sum = tl.load(ROWS + bh.to(tl.int64) * 2 * T + T + offs_m, mask=row_ok, other=0.0)
    inv_zc = tl.where(row_ok, 1.0 / tl.maximum(y_sum, 1e-6), 0.0)
    delta = tl.where(y_sum >= 1e-6, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), 0.0)
    st = STATS + bh.to(tl.int64) * n_iters * 3 * T
    a_last = tl.load(st + (n_iters - 1) * 3 * T + offs_m, mask=row_ok, other=0.0)
    eps_f = tl.load(EPS + n_iters)
    cf = scale * LOG2E / eps_f
    thr = -a_last / scale
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    km_ptr = KM + b * S
    mid = unmasked_key_end(pid_m, T, S, CAUSAL, HAS_KM, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, mid, BLOCK_N):
        acc = _prepass_step(q, do, k_base, v_base, sks, svs, n0, offs_m, offs_d, T, S, km_ptr, thr, cf, delta,
                            acc, CAUSAL, HAS_KM, False, D, BLOCK_D, BLOCK_N, PRECISION)
    for n0 in range(mid, key_range_end(pid_m, T, S, CAUSAL, BLOCK_M), BLOCK_N):
        acc = _prepass_step(q, do, k_base, v_base, sks, svs, n0, offs_m, offs_d, T, S, km_ptr, thr, cf, delta,
                            acc, CAUSAL, HAS_KM, True, D, BLOCK_D, BLOCK_N, PRECISION)
    rb = RB + bh.to(tl.int64) * 4 * T
    tl.store(rb + offs_m, delta, mask=row_ok)
    tl.store(rb + T + offs_m, inv_zc, mask=row_ok)
    # abar_t for t = n-1 .. 1 (iteration 0 does not depend on s); R = max threshold over t >= t_c
    abar = acc * inv_zc / eps_f
    ab = ABAR + bh.to(tl.int64) * n_iters * T
    r_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for i in range(n_iters - 1):
        t = n_iters - 1 - i
        tl.store(ab + t * T + offs_m, abar, mask=row_ok)
        thr_t = -tl.load(st + (t - 1) * 3 * T + offs_m, mask=row_ok, other=0.0) / scale
        r_max = tl.where(t >= t_c, tl.maximum(r_max, thr_t), r_max)
        abar = abar * tl.load(st + (t * 3 + 2) * T + offs_m, mask=row_ok, other=0.0)
    # the factored sum's weights w_t = abar_t exp(R/eps_c - lse_t), and whether float32 holds them
    c_r = scale / tl.load(EPS + n_iters - 1)
    worst_e = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    worst_w = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    w_base = W + bh.to(tl.int64) * n_iters * T
    for t in range(t_c, n_iters):
        abar_t = tl.load(ab + t * T + offs_m, mask=row_ok, other=0.0)
        e_t = r_max * c_r - tl.load(st + (t * 3 + 1) * T + offs_m, mask=row_ok, other=0.0)
        tl.store(w_base + t * T + offs_m, abar_t * tl.exp(tl.minimum(e_t, 80.0)), mask=row_ok)
        worst_e = tl.maximum(worst_e, e_t)
        worst_w = tl.maximum(worst_w, e_t + tl.log(tl.abs(abar_t)))
    safe = (worst_e <= exp_limit) & (worst_w <= 85.0)
    tl.store(rb + 2 * T + offs_m, r_max, mask=row_ok)
    tl.store(rb + 3 * T + offs_m, safe.to(tl.float32), mask=row_ok)


@triton.jit
def _exact_terms(ds, qk, offs_m, row_ok, st, ab, EPS, T, scale, T_LO: tl.constexpr, T_HI: tl.constexpr):
    """ds -= sum_{T_LO <= t < T_HI} abar_t exp(s/eps_t - lse_t) [qk <= thr_t]: one exp per iteration.
    (Unrolling this loop made the compiler keep every iteration's row vectors live and spill.)"""
    for t in range(T_LO, T_HI):
        thr_t = -tl.load(st + (t - 1) * 3 * T + offs_m, mask=row_ok, other=0.0) / scale
        lse2 = tl.load(st + (t * 3 + 1) * T + offs_m, mask=row_ok, other=0.0) * LOG2E
        abar = tl.load(ab + t * T + offs_m, mask=row_ok, other=0.0)
        c2 = scale * LOG2E / tl.load(EPS + t)
        p = tl.math.exp2(qk * c2 - lse2[:, None])  # softmax weight of iteration t on unsaturated keys
        ds -= tl.where(qk <= thr_t[:, None], abar[:, None] * p, 0.0)
    return ds


@triton.jit
def _ds_tile(qk, dp, offs_m, offs_n, row_ok, T, S, km_ptr, st, ab, w_base, rb, EPS, scale,
             N_ITERS: tl.constexpr, T_C: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr,
             MASKED: tl.constexpr, UNROLL: tl.constexpr):
    """(dL/d raw qk, y / Zc) on a (BLOCK_M, BLOCK_N) tile."""
    a_last = tl.load(st + (N_ITERS - 1) * 3 * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(rb + offs_m, mask=row_ok, other=0.0)
    inv_zc = tl.load(rb + T + offs_m, mask=row_ok, other=0.0)
    inv_eps_f = 1.0 / tl.load(EPS + N_ITERS)
    thr = -a_last / scale
    y = tl.math.exp2((tl.minimum(qk, thr[:, None]) - thr[:, None]) * (scale * LOG2E * inv_eps_f))
    g = (dp - delta[:, None]) * inv_zc[:, None]
    ds = tl.where(qk <= thr[:, None], g * y, 0.0) * inv_eps_f
    ds = _exact_terms(ds, qk, offs_m, row_ok, st, ab, EPS, T, scale, 1, T_C)
    if T_C < N_ITERS:
        safe = tl.min(tl.load(rb + 3 * T + offs_m, mask=row_ok, other=1.0), 0) > 0
        if safe:
            r = tl.load(rb + 2 * T + offs_m, mask=row_ok, other=0.0)
            e = tl.math.exp2((tl.minimum(qk, r[:, None]) - r[:, None]) * (scale * LOG2E / tl.load(EPS + N_ITERS - 1)))
            acc_w = tl.zeros_like(qk)
            for t0 in range(T_C, N_ITERS, UNROLL):  # UNROLL iterations a trip: their row loads issue together
                for u in tl.static_range(UNROLL):
                    t = t0 + u
                    ok = row_ok & (offs_m * 0 + t < N_ITERS)  # the last trip may run past N_ITERS
                    thr_t = -tl.load(st + (t - 1) * 3 * T + offs_m, mask=ok, other=0.0) / scale
                    w = tl.load(w_base + t * T + offs_m, mask=ok, other=0.0)
                    acc_w += tl.where(qk <= thr_t[:, None], w[:, None], 0.0)
            ds -= e * acc_w
        else:
            ds = _exact_terms(ds, qk, offs_m, row_ok, st, ab, EPS, T, scale, T_C, N_ITERS)
    if MASKED:
        vis = visible_tile(offs_m, offs_n, T, S, km_ptr, CAUSAL, HAS_KM)
        ds = tl.where(vis, ds, 0.0)
        y = tl.where(vis, y, 0.0)
    return ds * scale, y * inv_zc[:, None]


@triton.jit
def _dq_step(q, do, dq, k_base, v_base, sks, svs, n0, offs_m, offs_d, row_ok, T, S, km_ptr, st, ab, w_base, rb,
             EPS, scale, N_ITERS: tl.constexpr, T_C: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr,
             MASKED: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr, UNROLL: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_key_tile(k_base, sks, offs_n, offs_d, S, D, BLOCK_D, MASKED, False)  # (BLOCK_N, BLOCK_D)
    v = load_key_tile(v_base, svs, offs_n, offs_d, S, D, BLOCK_D, MASKED, False)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds, _ = _ds_tile(qk, dp, offs_m, offs_n, row_ok, T, S, km_ptr, st, ab, w_base, rb, EPS, scale, N_ITERS, T_C,
                     CAUSAL, HAS_KM, MASKED, UNROLL)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _attn_backward_dq_kernel(Q, K, V, KM, DO, DQ, STATS, EPS, RB, ABAR, W,
                             sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh,
                             T, S, H, scale, N_ITERS: tl.constexpr, T_C: tl.constexpr,
                             CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             PRECISION: tl.constexpr, UNROLL: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    md = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=md, other=0.0)
    do = tl.load(DO + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=md, other=0.0)
    st = STATS + bh.to(tl.int64) * N_ITERS * 3 * T
    ab = ABAR + bh.to(tl.int64) * N_ITERS * T
    w_base = W + bh.to(tl.int64) * N_ITERS * T
    rb = RB + bh.to(tl.int64) * 4 * T
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    km_ptr = KM + b * S
    mid = unmasked_key_end(pid_m, T, S, CAUSAL, HAS_KM, BLOCK_M, BLOCK_N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, mid, BLOCK_N):
        dq = _dq_step(q, do, dq, k_base, v_base, sks, svs, n0, offs_m, offs_d, row_ok, T, S, km_ptr, st, ab,
                      w_base, rb, EPS, scale, N_ITERS, T_C, CAUSAL, HAS_KM, False, D, BLOCK_D, BLOCK_N, PRECISION,
                      UNROLL)
    for n0 in range(mid, key_range_end(pid_m, T, S, CAUSAL, BLOCK_M), BLOCK_N):
        dq = _dq_step(q, do, dq, k_base, v_base, sks, svs, n0, offs_m, offs_d, row_ok, T, S, km_ptr, st, ab,
                      w_base, rb, EPS, scale, N_ITERS, T_C, CAUSAL, HAS_KM, True, D, BLOCK_D, BLOCK_N, PRECISION,
                      UNROLL)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=md)


@triton.jit
def _dkdv_step(q_base, do_base, sqt, sot, kt, vt, dk, dv, m0, offs_n, offs_d, T, S, km_ptr, st, ab, w_base, rb,
               EPS, scale, N_ITERS: tl.constexpr, T_C: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr,
               MASKED: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
               UNROLL: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    md = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=md, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sot + offs_d[None, :], mask=md, other=0.0)
    qk = tl.dot(q, kt, input_precision=PRECISION)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds, y_over_z = _ds_tile(qk, dp, offs_m, offs_n, row_ok, T, S, km_ptr, st, ab, w_base, rb, EPS, scale,
                            N_ITERS, T_C, CAUSAL, HAS_KM, MASKED, UNROLL)
    dv += tl.dot(tl.trans(y_over_z).to(do.dtype), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_backward_dkdv_kernel(Q, K, V, KM, DO, DK, DV, STATS, EPS, RB, ABAR, W,
                               sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh,
                               T, S, H, scale, N_ITERS: tl.constexpr, T_C: tl.constexpr,
                               CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               PRECISION: tl.constexpr, UNROLL: tl.constexpr):
    pid_n = tl.program_id(0)
    bh, b, h = batch_head(H)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nd = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=nd, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=nd, other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    st = STATS + bh.to(tl.int64) * N_ITERS * 3 * T
    ab = ABAR + bh.to(tl.int64) * N_ITERS * T
    w_base = W + bh.to(tl.int64) * N_ITERS * T
    rb = RB + bh.to(tl.int64) * 4 * T
    km_ptr = KM + b * S
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sob + h * soh
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # query blocks [lo, full) need the visibility mask, [full, T) see every key of this block
    lo = 0
    full = 0
    if CAUSAL:  # query i sees key j iff i >= j - (S - T)
        lo = tl.maximum(n0 - (S - T), 0) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - (S - T), 0), BLOCK_M) * BLOCK_M, lo)
    full = tl.where(n0 + BLOCK_N > S, T, tl.minimum(full, T))
    if HAS_KM:
        full = T
    for m0 in range(lo, full, BLOCK_M):
        dk, dv = _dkdv_step(q_base, do_base, sqt, sot, kt, vt, dk, dv, m0, offs_n, offs_d, T, S, km_ptr, st, ab,
                            w_base, rb, EPS, scale, N_ITERS, T_C, CAUSAL, HAS_KM, True, D, BLOCK_M, PRECISION,
                            UNROLL)
    for m0 in range(full, T, BLOCK_M):
        dk, dv = _dkdv_step(q_base, do_base, sqt, sot, kt, vt, dk, dv, m0, offs_n, offs_d, T, S, km_ptr, st, ab,
                            w_base, rb, EPS, scale, N_ITERS, T_C, CAUSAL, HAS_KM, False, D, BLOCK_M, PRECISION,
                            UNROLL)
    tl.store(DK + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=nd)
    tl.store(DV + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=nd)


def grouped_start(eps_sched: list[float], n_iters: int) -> int:
    """t_c: the first iteration (>= 1) from which every later one uses the same eps (the factored sum)."""
    t_c = n_iters
    while t_c - 1 >= 1 and eps_sched[t_c - 1] == eps_sched[n_iters - 1]:
        t_c -= 1
    return t_c


class AttentionBackward:
    """The three backward launches over shared buffers; run() does all, the benchmark times each."""

    def __init__(self, q, k, v, out, grad_out, key_mask, stats, rows, eps_sched, t_c, n_iters, scale, causal,
                 cfg):
        bsz, t, h, d = q.shape
        dev = q.device
        self.q, self.k, self.v, self.out, self.grad_out = q, k, v, out, grad_out
        self.stats, self.rows, self.eps_sched = stats, rows, eps_sched
        self.km = key_mask if key_mask is not None else q
        self.rb = torch.empty((bsz * h, 4, t), dtype=torch.float32, device=dev)
        self.abar = torch.empty((bsz * h, n_iters, t), dtype=torch.float32, device=dev)
        self.w = torch.empty((bsz * h, n_iters, t), dtype=torch.float32, device=dev)
        self.dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
        self.dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
        self.dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
        self.strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
        self.sizes = (t, k.shape[1], h)
        self.n_iters, self.t_c, self.scale, self.cfg = n_iters, t_c, scale, cfg
        self.flags = dict(CAUSAL=causal, HAS_KM=key_mask is not None, D=d)
        self.meta_m, self.meta_n = launch_meta(cfg, "bwd_m"), launch_meta(cfg, "bwd_n")
        self.grid_m = (triton.cdiv(t, self.meta_m["BLOCK_M"]), bsz * h)
        self.grid_n = (triton.cdiv(k.shape[1], self.meta_n["BLOCK_N"]), bsz * h)
        # compile-time: static branches on t_c < n_iters; UNROLL iterations of the factored sum per trip
        self.unrolled = dict(N_ITERS=n_iters, T_C=t_c, UNROLL=cfg.get("unroll", 4))

    def prepass(self):
        _attn_backward_prepass_kernel[self.grid_m](
            self.q, self.k, self.v, self.km, self.out, self.grad_out, self.stats, self.rows, self.eps_sched,
            self.rb, self.abar, self.w, *self.strides, *self.sizes, self.n_iters, self.t_c, self.scale,
            self.cfg.get("exp_limit", 60.0), **self.flags, **self.meta_m)

    def grad_q(self):
        _attn_backward_dq_kernel[self.grid_m](
            self.q, self.k, self.v, self.km, self.grad_out, self.dq, self.stats, self.eps_sched, self.rb,
            self.abar, self.w, *self.strides, *self.sizes, self.scale, **self.unrolled, **self.flags, **self.meta_m)

    def grad_kv(self):
        _attn_backward_dkdv_kernel[self.grid_n](
            self.q, self.k, self.v, self.km, self.grad_out, self.dk, self.dv, self.stats, self.eps_sched, self.rb,
            self.abar, self.w, *self.strides, *self.sizes, self.scale, **self.unrolled, **self.flags, **self.meta_n)

    def run(self):
        self.prepass()
        self.grad_q()
        self.grad_kv()
        return self.dq, self.dk, self.dv


def attention_backward(q, k, v, out, grad_out, key_mask, stats, rows, eps_sched, t_c, n_iters, scale, causal,
                       cfg):
    """(dq, dk, dv) in the inputs' dtype; q, k, v, out, grad_out contiguous (B, T|S, H, D)."""
    return AttentionBackward(q, k, v, out, grad_out, key_mask, stats, rows, eps_sched, t_c, n_iters, scale,
                             causal, cfg).run()
