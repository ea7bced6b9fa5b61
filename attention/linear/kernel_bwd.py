"""Backward of the Triton linear attention (kernel.py). Derivation in README.md; per (b, h), with
g = dL/dout, gn_i = g_i / max(den_i, eps) and gd_i = -(g_i . out_i) / den_i (0 where den_i < eps):

    dL/dA_ij = gn_i . v_j + gd_i                       for the pairs the forward used (j <= i causal)
    dphi_q_i = sum_j dA_ij phi_k_j  = S_i gn_i + z_i gd_i      forward-time state (S, z) as in the forward
    dphi_k_j = sum_i dA_ij phi_q_i  = P_j v_j + p_j             reverse-time state over the queries i >= j:
    dv_j     = sum_i A_ij gn_i      = P_j^T phi_k_j             P_j = sum phi_q_i gn_i^T, p_j = sum phi_q_i gd_i
    dq = dphi_q * phi'(q),  dk = dphi_k * phi'(k) * key_mask

Causal: two kinds of program per (segment, b*h) in one launch (grid axis 2): kind 0 scans the segment's
chunks forward from the state entering it (the sum of the forward's earlier segment sums) and writes dq;
kind 1 scans them backward from the reverse state of the later segments (the sum of their (phi_q gn^T,
phi_q gd) sums, one segment-sums launch before, when there is more than one segment) and writes dk, dv.
Non-causal: the (P, p) sums of the query segments, then one launch of query segments (dq) and key
segments (dk, dv) against the totals.

gd: dk, dv and the reverse state take it from the stored output (g . out, as flash attention's delta),
which is rounded to the input dtype. dq cannot: its two terms cancel (dphi_q_i = sum_j phi_k_j
gn_i . (v_j - out_i) when den_i >= eps), and the rounded output made dq's error 2.1x the PyTorch path's
at T = 4k..16k in bf16 (docs/benchmarks.md). So dq takes gd_i = -(gn_i . num_i) / den_i from the exact
num_i = sum_j A_ij v_j + S_i^T phi_q_i, assembled from tiles it has anyway:
    gn_i . num_i = sum_j A_ij (gn_i . v_j) + phi_q_i . (S_i gn_i)     (one more C x C product, A = phi_q phi_k^T)
and runs these products in tf32x3 where the others run in tf32 (kernel.py). Nothing of size T x F or
per chunk is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention.linear.kernel import (
    Segments,
    _dot,
    _dot_exact,
    _feature_rows,
    _key_keep,
    _phi,
    _phi_grad,
    _query_grads,
    _rows,
    _scaled_grads,
    _store_rows,
    _summed_states,
    launch_meta,
    state_sums,
    strides3,
)
from attention.triton_helpers import batch_head


@triton.jit
def _dq_pass(q_base, k_base, v_base, km_base, do_base, den_base, dq_base, sum_s, sum_z, row0, seg,
             sqt, skt, svt, sdt, sgt, start, end, eps,
             FEATURE: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """dq of the chunks in [start, end), scanning forward from the state (S, z) entering `start`: the
    forward's sums of segments 0 .. seg - 1 (rows row0 + s)."""
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    state, z = _summed_states(sum_s, sum_z, row0, 0, seg, offs_d, offs_v, BLOCK_D, BLOCK_DV)
    causal = offs_c[:, None] >= offs_c[None, :]  # (query c, key s): s <= c
    for c0 in range(start, end, CHUNK):
        offs_t = c0 + offs_c
        keep = _key_keep(km_base, offs_t, end, HAS_KM)
        phi_k = _feature_rows(k_base, skt, offs_t, offs_d, end, keep, FEATURE, D)  # (C, BLOCK_D)
        v = _rows(v_base, svt, offs_t, offs_v, end, DV)  # (C, BLOCK_DV)
        x = _rows(q_base, sqt, offs_t, offs_d, end, D)
        phi_q = _phi(x, (offs_t[:, None] < end) & (offs_d[None, :] < D), FEATURE)
        gn, den = _scaled_grads(do_base, sdt, den_base, offs_t, offs_v, end, eps, DV)
        scores = tl.where(causal, _dot_exact(phi_q, tl.trans(phi_k), PRECISION), 0.0)  # A (C, C)
        g_dot_v = _dot_exact(gn, tl.trans(v), PRECISION)  # (C, C): gn_i . v_j
        g_state = _dot_exact(gn, tl.trans(state), PRECISION)  # (C, BLOCK_D): S gn_i
        g_dot_num = tl.sum(scores * g_dot_v, 1) + tl.sum(phi_q * g_state, 1)
        gd = tl.where(den >= eps, -g_dot_num / tl.maximum(den, eps), 0.0)
        d_scores = tl.where(causal, g_dot_v + gd[:, None], 0.0)  # dL/dA
        d_phi = _dot(d_scores, phi_k, PRECISION) + g_state + gd[:, None] * z[None, :]
        _store_rows(dq_base, sgt, offs_t, offs_d, end, d_phi * _phi_grad(x, FEATURE), D)
        state += _dot(tl.trans(phi_k), v, PRECISION)
        z += tl.sum(phi_k, 0)


@triton.jit
def _dkdv_pass(q_base, k_base, v_base, km_base, o_base, do_base, den_base, dk_base, dv_base, sum_p, sum_pz,
               row0, seg, n_seg, sqt, skt, svt, sot, sdt, sgt, sgvt, start, end, eps,
               FEATURE: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of the chunks in [start, end), scanning backward from the reverse state (P, p) of the
    queries after `end`: the query sums of segments seg + 1 .. n_seg - 1 (rows row0 + s). Tiles are
    transposed (keys on rows) so no (C, C) tile is transposed."""
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    rev, rev_z = _summed_states(sum_p, sum_pz, row0, seg + 1, n_seg, offs_d, offs_v, BLOCK_D, BLOCK_DV)
    causal_t = offs_c[None, :] >= offs_c[:, None]  # (key s, query c): c >= s
    n_chunks = tl.cdiv(end - start, CHUNK)
    for i in range(0, n_chunks):
        offs_t = start + (n_chunks - 1 - i) * CHUNK + offs_c
        phi_q = _feature_rows(q_base, sqt, offs_t, offs_d, end, offs_t < end, FEATURE, D)
        gn, gd = _query_grads(do_base, sdt, o_base, sot, den_base, offs_t, offs_v, end, eps, DV)
        keep = _key_keep(km_base, offs_t, end, HAS_KM)
        phi_k = _feature_rows(k_base, skt, offs_t, offs_d, end, keep, FEATURE, D)
        v = _rows(v_base, svt, offs_t, offs_v, end, DV)
        scores_t = tl.where(causal_t, _dot(phi_k, tl.trans(phi_q), PRECISION), 0.0)  # A^T
        dv = _dot(scores_t, gn, PRECISION) + _dot(phi_k, rev, PRECISION)
        d_scores_t = _dot(v, tl.trans(gn), PRECISION) + gd[None, :]  # dA^T
        d_scores_t = tl.where(causal_t, d_scores_t, 0.0)
        d_phi_k = (_dot(d_scores_t, phi_q, PRECISION)
                   + _dot(v, tl.trans(rev), PRECISION) + rev_z[None, :])
        x = _rows(k_base, skt, offs_t, offs_d, end, D)
        d_k = tl.where(keep[:, None], d_phi_k * _phi_grad(x, FEATURE), 0.0)
        _store_rows(dk_base, sgt, offs_t, offs_d, end, d_k, D)
        _store_rows(dv_base, sgvt, offs_t, offs_v, end, dv, DV)
        rev += _dot(tl.trans(phi_q), gn, PRECISION)
        rev_z += tl.sum(phi_q * gd[:, None], 0)


@triton.jit
def _causal_bwd_kernel(Q, K, V, KM, O, DO, DEN, DQ, DK, DVAL, SUM_S, SUM_Z, SUM_P, SUM_PZ,
                       sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sdb, sdt, sdh,
                       sgb, sgt, sgh, sgvb, sgvt, sgvh,
                       T, H, seg_len, n_seg, eps,
                       FEATURE: tl.constexpr, HAS_KM: tl.constexpr,
                       D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (n_seg, B*H, 2): axis 2 picks the dq scan (0) or the dk/dv scan (1) of one segment. SUM_S,
    SUM_Z: the forward's key segment sums; SUM_P, SUM_PZ: the query segment sums (_state_sums_kernel);
    neither is read with one segment. DQ and DK share a layout (strides sg*), DVAL (dv) has its own."""
    seg = tl.program_id(0)
    bh, b, h = batch_head(H)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, T)
    row0 = bh.to(tl.int64) * n_seg
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    do_base = DO + b * sdb + h * sdh
    den_base = DEN + bh.to(tl.int64) * T
    km_base = KM + b * T
    if tl.program_id(2) == 0:
        _dq_pass(q_base, k_base, v_base, km_base, do_base, den_base, DQ + b * sgb + h * sgh,
                 SUM_S, SUM_Z, row0, seg, sqt, skt, svt, sdt, sgt, start, end, eps,
                 FEATURE, HAS_KM, D, DV, BLOCK_D, BLOCK_DV, CHUNK, PRECISION)
    else:
        _dkdv_pass(q_base, k_base, v_base, km_base, o_base, do_base, den_base, DK + b * sgb + h * sgh,
                   DVAL + b * sgvb + h * sgvh, SUM_P, SUM_PZ, row0, seg, n_seg,
                   sqt, skt, svt, sot, sdt, sgt, sgvt, start, end, eps,
                   FEATURE, HAS_KM, D, DV, BLOCK_D, BLOCK_DV, CHUNK, PRECISION)


@triton.jit
def _noncausal_bwd_kernel(Q, K, V, KM, O, DO, DEN, DQ, DK, DVAL, SUM_S, SUM_Z, SUM_P, SUM_PZ,
                          sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sdb, sdt, sdh,
                          sgb, sgt, sgh, sgkb, sgkt, sgkh, sgvb, sgvt, sgvh,
                          T, S, H, seg_len_q, n_seg_q, seg_len_k, n_seg_k, eps,
                          FEATURE: tl.constexpr, HAS_KM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Grid (segments, B*H, 2): kind 0 a segment of queries (dq = (S gn + z gd) phi'(q), (S, z) the sum of
    the key segments' sums), kind 1 a segment of keys (dk = (P v + p) phi'(k), dv = P^T phi_k, (P, p) the
    sum of the query segments' sums). A program past its kind's segments does nothing."""
    seg = tl.program_id(0)
    bh, b, h = batch_head(H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    if tl.program_id(2) == 0:
        if seg < n_seg_q:
            state, z = _summed_states(SUM_S, SUM_Z, bh.to(tl.int64) * n_seg_k, 0, n_seg_k, offs_d, offs_v,
                                      BLOCK_D, BLOCK_DV)
            start = seg * seg_len_q
            end = tl.minimum(start + seg_len_q, T)
            for c0 in range(start, end, CHUNK):
                offs_t = c0 + tl.arange(0, CHUNK)
                gn, den = _scaled_grads(DO + b * sdb + h * sdh, sdt, DEN + bh.to(tl.int64) * T, offs_t, offs_v,
                                        end, eps, DV)
                x = _rows(Q + b * sqb + h * sqh, sqt, offs_t, offs_d, end, D)
                phi_q = _phi(x, (offs_t[:, None] < end) & (offs_d[None, :] < D), FEATURE)
                g_state = _dot_exact(gn, tl.trans(state), PRECISION)  # (C, BLOCK_D): S gn_i
                gd = tl.where(den >= eps, -tl.sum(phi_q * g_state, 1) / tl.maximum(den, eps), 0.0)  # gn . num
                d_phi = g_state + gd[:, None] * z[None, :]
                _store_rows(DQ + b * sgb + h * sgh, sgt, offs_t, offs_d, end, d_phi * _phi_grad(x, FEATURE), D)
    else:
        if seg < n_seg_k:
            rev, rev_z = _summed_states(SUM_P, SUM_PZ, bh.to(tl.int64) * n_seg_q, 0, n_seg_q, offs_d, offs_v,
                                        BLOCK_D, BLOCK_DV)
            start = seg * seg_len_k
            end = tl.minimum(start + seg_len_k, S)
            k_base = K + b * skb + h * skh
            for c0 in range(start, end, CHUNK):
                offs_t = c0 + tl.arange(0, CHUNK)
                keep = _key_keep(KM + b * S, offs_t, end, HAS_KM)
                phi_k = _feature_rows(k_base, skt, offs_t, offs_d, end, keep, FEATURE, D)
                v = _rows(V + b * svb + h * svh, svt, offs_t, offs_v, end, DV)
                d_phi_k = _dot(v, tl.trans(rev), PRECISION) + rev_z[None, :]
                x = _rows(k_base, skt, offs_t, offs_d, end, D)
                d_k = tl.where(keep[:, None], d_phi_k * _phi_grad(x, FEATURE), 0.0)
                _store_rows(DK + b * sgkb + h * sgkh, sgkt, offs_t, offs_d, end, d_k, D)
                _store_rows(DVAL + b * sgvb + h * sgvh, sgvt, offs_t, offs_v, end, _dot(phi_k, rev, PRECISION), DV)


def linear_backward(q, k, v, km, out, den, sum_s, sum_z, grad_out, causal: bool, feature: int, eps: float,
                    tiles, cuts: tuple[Segments, Segments]):
    """(dq, dk, dv), each contiguous in its input's shape and q's dtype. sum_s, sum_z: the forward's key
    segment sums (None for a causal single segment); cuts: the forward's (keys, queries) segments."""
    b, t, h, d = q.shape
    s_len, dv = k.shape[1], v.shape[-1]
    keys, queries = cuts
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dvv = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    meta = launch_meta(tiles.bwd, d, dv, feature, q.dtype)
    km_arg = km if km is not None else q
    strides = (*strides3(q), *strides3(k), *strides3(v), *strides3(out), *strides3(grad_out))
    sum_p = sum_pz = None
    if queries.n_seg > 1 or not causal:
        sum_p, sum_pz = state_sums(q, grad_out, None, out, den, t, queries, feature, eps, tiles, True)
    sums = tuple(x if x is not None else den for x in (sum_s, sum_z, sum_p, sum_pz))  # den: never read
    if causal:
        _causal_bwd_kernel[(keys.n_seg, b * h, 2)](
            q, k, v, km_arg, out, grad_out, den, dq, dk, dvv, *sums, *strides, *strides3(dq), *strides3(dvv),
            t, h, keys.seg_len, keys.n_seg, eps, HAS_KM=km is not None, **meta)
    else:
        _noncausal_bwd_kernel[(max(keys.n_seg, queries.n_seg), b * h, 2)](
            q, k, v, km_arg, out, grad_out, den, dq, dk, dvv, *sums, *strides, *strides3(dq), *strides3(dk),
            *strides3(dvv), t, s_len, h, queries.seg_len, queries.n_seg, keys.seg_len, keys.n_seg, eps,
            HAS_KM=km is not None, **meta)
    return dq, dk, dvv
