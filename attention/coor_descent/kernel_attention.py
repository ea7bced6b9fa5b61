"""Fused coordinate-descent attention in Triton: no (T, S) tensor in forward or backward.

The weights of query row i are y_ij = exp(min(s_ij + a_i, 0) / eps_f) with s_ij = q_i.k_j * scale:
they depend on the scores and ONE scalar a_i per row (reference.py). So, like flash attention, a
program keeps a block of queries and streams the keys, recomputing q.k on the fly:

    iteration 0     a_0 = eps_0 (log k_i - log n_i)            n_i = visible keys (c = 0 everywhere)
    iteration t>=1  one pass over the keys: online logsumexp of min(s, -a_{t-1}) / eps_t -> a_t
    final pass      out_i = sum_j y_ij v_j / max(sum_j y_ij, 1e-6)

k_i = min(topk, n_i). Per row and iteration the forward keeps (a_t, lse_t, P_t) (P_t = softmax
mass on saturated keys, for the backward): O(T * n_iters) floats, never O(T * S). The backward
(kernel_attention_bwd.py) differentiates the unrolled iterations exactly, recomputing q.k per tile.

Scores use the raw q.k (BLOCK_M, BLOCK_N) tile: min(s + a, 0) = scale * (min(qk, thr) - thr) with
thr = -a / scale, which needs scale > 0. Exponentials are base 2 (log2(e) folded into the factors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention.triton_helpers import batch_head

LOG2E = tl.constexpr(1.4426950408889634)  # constexpr: jit functions may read it
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def visible_tile(offs_m, offs_n, T, S, km_ptr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query offs_m may use key offs_n (causal alignment to the end)."""
    vis = (offs_m[:, None] < T) & (offs_n[None, :] < S)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + (S - T))
    if HAS_KM:
        km = tl.load(km_ptr + offs_n, mask=offs_n < S, other=0) != 0
        vis = vis & km[None, :]
    return vis


@triton.jit
def key_range_end(pid_m, T, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key any query of block pid_m may see."""
    hi = S
    if CAUSAL:
        hi = tl.maximum(tl.minimum((pid_m + 1) * BLOCK_M + S - T, S), 0)
    return hi


@triton.jit
def unmasked_key_end(pid_m, T, S, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Key blocks below this offset are real keys visible to every query of block pid_m: those tiles
    skip the visibility mask (padded query rows compute garbage that is never stored)."""
    end = (S // BLOCK_N) * BLOCK_N
    if CAUSAL:
        end = tl.minimum(tl.maximum(pid_m * BLOCK_M + S - T + 1, 0) // BLOCK_N * BLOCK_N, end)
    if HAS_KM:
        end = 0
    return end


@triton.jit
def load_key_tile(base, stride, offs_n, offs_d, S, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, TRANSPOSED: tl.constexpr):
    """(BLOCK_N, BLOCK_D) rows of K or V, or its transpose; zeros past S and past D."""
    if TRANSPOSED:
        ptrs = base + offs_n[None, :] * stride + offs_d[:, None]
        if MASKED:
            tile = tl.load(ptrs, mask=(offs_n[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        elif BLOCK_D != D:
            tile = tl.load(ptrs, mask=offs_d[:, None] < D, other=0.0)
        else:
            tile = tl.load(ptrs)
    else:
        ptrs = base + offs_n[:, None] * stride + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        elif BLOCK_D != D:
            tile = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _lse_step(q, k_base, sks, n0, offs_m, offs_d, T, S, km_ptr, thr, c2, m2, l_sum, n_sat,
              CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, MASKED: tl.constexpr, D: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of iteration t: online logsumexp of min(qk, thr) * c2 and the saturated count."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kt = load_key_tile(k_base, sks, offs_n, offs_d, S, D, BLOCK_D, MASKED, True)
    qk = tl.dot(q, kt, input_precision=PRECISION)
    z = tl.minimum(qk, thr[:, None]) * c2
    sat = qk > thr[:, None]
    if MASKED:
        vis = visible_tile(offs_m, offs_n, T, S, km_ptr, CAUSAL, HAS_KM)
        z = tl.where(vis, z, float("-inf"))
        sat = sat & vis
    m_new = tl.maximum(m2, tl.max(z, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_sum = l_sum * tl.math.exp2(m2 - m_safe) + tl.sum(tl.math.exp2(z - m_safe[:, None]), 1)
    n_sat += tl.sum(sat.to(tl.float32), 1)
    return m_new, l_sum, n_sat


@triton.jit
def _output_step(q, k_base, v_base, sks, svs, n0, offs_m, offs_d, T, S, km_ptr, thr, cf, acc, y_sum,
                 CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, MASKED: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the final pass: y = exp(min(s + a, 0) / eps_f), acc += y v, y_sum += y."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kt = load_key_tile(k_base, sks, offs_n, offs_d, S, D, BLOCK_D, MASKED, True)
    qk = tl.dot(q, kt, input_precision=PRECISION)
    y = tl.math.exp2((tl.minimum(qk, thr[:, None]) - thr[:, None]) * cf)
    if MASKED:
        y = tl.where(visible_tile(offs_m, offs_n, T, S, km_ptr, CAUSAL, HAS_KM), y, 0.0)
    v = load_key_tile(v_base, svs, offs_n, offs_d, S, D, BLOCK_D, MASKED, False)
    acc += tl.dot(y.to(v.dtype), v, input_precision=PRECISION)
    return acc, y_sum + tl.sum(y, 1)


@triton.jit
def _attn_forward_kernel(Q, K, V, KM, O, STATS, ROWS, EPS,
                         sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh,
                         T, S, H, n_iters, topk, scale,
                         CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    km_ptr = KM + b * S
    hi = key_range_end(pid_m, T, S, CAUSAL, BLOCK_M)
    mid = unmasked_key_end(pid_m, T, S, CAUSAL, HAS_KM, BLOCK_M, BLOCK_N)

    # iteration 0: c = s + b = 0 on every visible key, so lse_0 = log(n_i)
    if HAS_KM:
        n_vis = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            vis = visible_tile(offs_m, offs_n, T, S, km_ptr, CAUSAL, HAS_KM)
            n_vis += tl.sum(vis.to(tl.float32), 1)
    else:
        if CAUSAL:
            n_vis = tl.minimum(tl.maximum(offs_m + S - T + 1, 0), S).to(tl.float32)
        else:
            n_vis = tl.zeros((BLOCK_M,), tl.float32) + S
    n_vis = tl.where(row_ok, n_vis, 0.0)
    logk = tl.log(tl.maximum(tl.minimum(n_vis, topk), 1e-20))
    lse = tl.log(tl.maximum(n_vis, 1.0))  # a row with no visible key: any finite a, its y is 0
    a = tl.load(EPS) * (logk - lse)
    st = STATS + bh.to(tl.int64) * n_iters * 3 * T
    tl.store(st + offs_m, a, mask=row_ok)
    tl.store(st + T + offs_m, lse, mask=row_ok)
    tl.store(st + 2 * T + offs_m, tl.zeros((BLOCK_M,), tl.float32), mask=row_ok)

    for t in range(1, n_iters):
        eps_t = tl.load(EPS + t)
        inv_eps = 1.0 / eps_t
        c2 = scale * LOG2E * inv_eps
        thr = -a / scale  # in raw q.k units: s + a > 0  <=>  qk > thr
        m2 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_M,), tl.float32)
        n_sat = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, mid, BLOCK_N):
            m2, l_sum, n_sat = _lse_step(q, k_base, sks, n0, offs_m, offs_d, T, S, km_ptr, thr, c2, m2, l_sum,
                                         n_sat, CAUSAL, HAS_KM, False, D, BLOCK_D, BLOCK_N, PRECISION)
        for n0 in range(mid, hi, BLOCK_N):
            m2, l_sum, n_sat = _lse_step(q, k_base, sks, n0, offs_m, offs_d, T, S, km_ptr, thr, c2, m2, l_sum,
                                         n_sat, CAUSAL, HAS_KM, True, D, BLOCK_D, BLOCK_N, PRECISION)
        m_safe = tl.where(m2 == float("-inf"), 0.0, m2)
        has = l_sum > 0
        lse = tl.where(has, (m_safe + tl.log2(tl.where(has, l_sum, 1.0))) * LN2, 0.0)
        p_sat = n_sat * tl.exp(-a * inv_eps - lse)
        a = eps_t * (logk - lse)
        st_t = st + t * 3 * T
        tl.store(st_t + offs_m, a, mask=row_ok)
        tl.store(st_t + T + offs_m, lse, mask=row_ok)
        tl.store(st_t + 2 * T + offs_m, p_sat, mask=row_ok)

    cf = scale * LOG2E / tl.load(EPS + n_iters)
    thr = -a / scale
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    y_sum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, mid, BLOCK_N):
        acc, y_sum = _output_step(q, k_base, v_base, sks, svs, n0, offs_m, offs_d, T, S, km_ptr, thr, cf, acc,
                                  y_sum, CAUSAL, HAS_KM, False, D, BLOCK_D, BLOCK_N, PRECISION)
    for n0 in range(mid, hi, BLOCK_N):
        acc, y_sum = _output_step(q, k_base, v_base, sks, svs, n0, offs_m, offs_d, T, S, km_ptr, thr, cf, acc,
                                  y_sum, CAUSAL, HAS_KM, True, D, BLOCK_D, BLOCK_N, PRECISION)
    out = acc / tl.maximum(y_sum, 1e-6)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    rows = ROWS + bh.to(tl.int64) * 2 * T
    tl.store(rows + offs_m, logk, mask=row_ok)
    tl.store(rows + T + offs_m, y_sum, mask=row_ok)


def attention_config(dtype: torch.dtype, head_dim: int, interpret: bool) -> dict:
    """Tiles and warps per kernel: "fwd" (forward), "bwd_m" (backward prepass and dq: programs over
    query blocks), "bwd_n" (dk, dv: programs over key blocks). Optional keys: "unroll" (iterations of the
    backward's factored sum per loop trip, default 4), "exp_limit" (kernel_attention_bwd.py).
    fp32 inputs use exact fp32 dot products (slow; fp16/bf16 are the fast path): y divides scores by
    eps, so tf32's 1e-3 error in q.k would come out amplified."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpret:
        tile = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)
        return dict(BLOCK_D=block_d, PRECISION="ieee", fwd=tile, bwd_m=tile, bwd_n=tile)
    if dtype == torch.float32:  # fp32 dot products run on FMA units: small tiles keep registers
        tile = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)
        return dict(BLOCK_D=block_d, PRECISION="ieee", fwd=tile, bwd_m=tile, bwd_n=tile)
    if block_d > 64:
        return dict(BLOCK_D=block_d, PRECISION="tf32", fwd=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4),
                    bwd_m=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8), bwd_n=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8))
    # measured on an H100 (docs/benchmarks.md): 128x128 forward tiles, 64x32 dk/dv tiles
    return dict(BLOCK_D=block_d, PRECISION="tf32", fwd=dict(BLOCK_M=128, BLOCK_N=128, num_warps=8),
                bwd_m=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8),
                bwd_n=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8))


def launch_meta(cfg: dict, kernel: str) -> dict:
    return dict(BLOCK_D=cfg["BLOCK_D"], PRECISION=cfg["PRECISION"], **cfg[kernel])


def attention_forward(q, k, v, key_mask, topk, eps_sched, n_iters, scale, causal, cfg):
    """out (B, T, H, D) in q's dtype, stats (B*H, n_iters, 3, T) and rows (B*H, 2, T) float32."""
    bsz, t, h, d = q.shape
    s = k.shape[1]
    dev = q.device
    out = torch.empty((bsz, t, h, d), dtype=q.dtype, device=dev)
    stats = torch.empty((bsz * h, n_iters, 3, t), dtype=torch.float32, device=dev)
    rows = torch.empty((bsz * h, 2, t), dtype=torch.float32, device=dev)
    km = key_mask if key_mask is not None else q
    grid = (triton.cdiv(t, cfg["fwd"]["BLOCK_M"]), bsz * h)
    _attn_forward_kernel[grid](q, k, v, km, out, stats, rows, eps_sched,
                               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                               out.stride(2), t, s, h, n_iters, float(topk), scale,
                               CAUSAL=causal, HAS_KM=key_mask is not None, D=d,
                               **launch_meta(cfg, "fwd"))
    return out, stats, rows
