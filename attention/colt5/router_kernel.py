"""Triton kernels of the causal CoLT5 routers (causal_router.py holds the PyTorch path, their reference).

Both run the coordinate-descent iterations of attention/coor_descent/reference.py for many rows in one
launch, keeping only the row dual a (the routers need nothing else):

    c_t = 0 (t = 0), min(s, -a_{t-1}) (t >= 1);  lse_t = logsumexp_j(c_t / eps_t);  a_t = eps_t (log k - lse_t)

over the row's candidates (a row with none gets lse_t = BIG_NEG, as the reference's masked fill gives).

- window_dual_triton (CausalWindowRouter): one program per window row of the (B, N, W) scores; returns
  a_{n-1} per row, differentiable in the scores, and the row sum of its own fit exp(min(s + a, 0) / eps)
  (the convergence statistic). Backward (exact gradient of the unrolled iterations, as
  attention/coor_descent/kernel_rows.py derives it): the forward keeps (a_t, lse_t, P_t) per row and
  iteration, P_t the softmax mass of the saturated entries (s + a_{t-1} > 0); with abar = dL/da_{n-1},
      ds_j = - sum_{t >= 1} abar_t exp(s_j / eps_t - lse_t) [s_j + a_{t-1} <= 0],  abar_{t-1} = abar_t P_t.
- prefix_route_triton (CausalPrefixRouter, no gradient): one program per (batch, route, window n) over
  the prefix of positions < n W: the top-K candidates (bisection on the order-preserving integer image
  of the float32 scores, 32 counting passes, then a compaction in position order: ties at the K-th value
  go to the earliest positions), and the prefix's dual a_n with budget min(count, K * 9/8). Work per
  window is linear in its prefix (O(T^2 / W) in all, like the reference, but in one launch that reads
  the scores from L2, with no (windows x T) tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention.coor_descent.kernel_rows import eps_schedule, eps_tensor

BIG_NEG = tl.constexpr(torch.finfo(torch.float32).min / 4)  # the reference's fill for a masked candidate
NEG = tl.constexpr(-1.0e38)  # finite stand-in for -inf in the running max


@triton.jit
def _row_stats(S, V, s_base, v_base, length, BLOCK: tl.constexpr):
    """(candidate count, largest candidate score) of [0, length). Accumulators are per lane, reduced
    once at the end: a block reduction per loop step would dominate the long prefix rows."""
    count = tl.zeros((BLOCK,), tl.int32)
    top = tl.full((BLOCK,), NEG, tl.float32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < length
        s = tl.load(S + s_base + offs, mask=inb, other=0.0).to(tl.float32)
        ok = inb & (tl.load(V + v_base + offs, mask=inb, other=0) != 0)
        count += ok.to(tl.int32)
        top = tl.maximum(top, tl.where(ok, s, NEG))
    return tl.sum(count, 0), tl.max(top, 0)


@triton.jit
def _lse_pass(S, V, s_base, v_base, length, a_prev, eps_t, first, shift, BLOCK: tl.constexpr):
    """(sum of exp(c / eps_t - shift), count of saturated candidates s + a_prev > 0) over the candidates
    of [0, length). shift is the exact max of c / eps_t: max_j min(s_j, -a) = min(max_j s_j, -a)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    n_sat = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < length
        s = tl.load(S + s_base + offs, mask=inb, other=0.0).to(tl.float32)
        ok = inb & (tl.load(V + v_base + offs, mask=inb, other=0) != 0)
        x = tl.where(first, 0.0, tl.minimum(s, -a_prev) / eps_t)
        acc += tl.where(ok, tl.exp(x - shift), 0.0)
        n_sat += (ok & (s + a_prev > 0)).to(tl.int32)
    return tl.sum(acc, 0), tl.sum(n_sat, 0)


@triton.jit
def _dual(S, V, s_base, v_base, length, logk, EPS, STATS, stats_base, n_iters, SAVE: tl.constexpr,
          BLOCK: tl.constexpr):
    """a_{n_iters - 1} of one row; with SAVE, (a_t, lse_t, P_t) of every iteration at STATS + stats_base."""
    count, s_max = _row_stats(S, V, s_base, v_base, length, BLOCK)
    a = tl.full((), 0.0, tl.float32)
    for t in range(0, n_iters):
        eps_t = tl.load(EPS + t)
        shift = tl.where(t == 0, 0.0, tl.minimum(s_max, -a) / eps_t)
        acc, n_sat = _lse_pass(S, V, s_base, v_base, length, a, eps_t, t == 0, shift, BLOCK)
        lse = tl.where(count > 0, shift + tl.log(tl.maximum(acc, 1e-30)), BIG_NEG)
        a_new = eps_t * (logk - lse)
        if SAVE:
            sat_mass = tl.where((t == 0) | (n_sat == 0), 0.0, n_sat.to(tl.float32) * tl.exp(-a / eps_t - lse))
            tl.store(STATS + stats_base + t * 3, a_new)
            tl.store(STATS + stats_base + t * 3 + 1, lse)
            tl.store(STATS + stats_base + t * 3 + 2, sat_mass)
        a = a_new
    return a


@triton.jit
def _window_dual_fwd(S, V, LOGK, EPS, A, STATS, YSUM, W, n_iters, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * W
    a = _dual(S, V, base, base, W, tl.load(LOGK + row), EPS, STATS, row * n_iters * 3, n_iters, True, BLOCK)
    tl.store(A + row, a)
    eps_f = tl.load(EPS + n_iters)
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, W, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < W
        s = tl.load(S + base + offs, mask=inb, other=0.0).to(tl.float32)
        ok = inb & (tl.load(V + base + offs, mask=inb, other=0) != 0)
        total += tl.sum(tl.where(ok, tl.exp(tl.minimum(s + a, 0.0) / eps_f), 0.0), 0)
    tl.store(YSUM + row, total)


@triton.jit
def _window_dual_bwd(S, V, STATS, EPS, ABAR, DS, W, n_iters, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * W
    stats = STATS + row * n_iters * 3
    abar_last = tl.load(ABAR + row)
    for start in range(0, W, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < W
        s = tl.load(S + base + offs, mask=inb, other=0.0).to(tl.float32)
        ok = inb & (tl.load(V + base + offs, mask=inb, other=0) != 0)
        ds = tl.zeros((BLOCK,), tl.float32)
        abar = abar_last
        for j in range(0, n_iters - 1):
            t = n_iters - 1 - j
            a_prev = tl.load(stats + (t - 1) * 3)
            lse = tl.load(stats + t * 3 + 1)
            eps_t = tl.load(EPS + t)
            unsat = ok & (s + a_prev <= 0)
            ds -= tl.where(unsat, abar * tl.exp(s / eps_t - lse), 0.0)
            abar = abar * tl.load(stats + t * 3 + 2)
        tl.store(DS + base + offs, ds.to(DS.dtype.element_ty), mask=inb)


@triton.jit
def _sortable(s):
    """float32 -> int64 with the same order (for non-NaN values)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _count_at_least(S, V, s_base, v_base, length, t1, t2, t3, BLOCK: tl.constexpr):
    """Candidates whose key is >= t1, t2, t3 (three thresholds per pass: 2 bits of the bisection)."""
    c1 = tl.zeros((BLOCK,), tl.int32)
    c2 = tl.zeros((BLOCK,), tl.int32)
    c3 = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < length
        s = tl.load(S + s_base + offs, mask=inb, other=0.0).to(tl.float32)
        ok = inb & (tl.load(V + v_base + offs, mask=inb, other=0) != 0)
        key = _sortable(s)
        c1 += (ok & (key >= t1)).to(tl.int32)
        c2 += (ok & (key >= t2)).to(tl.int32)
        c3 += (ok & (key >= t3)).to(tl.int32)
    return tl.sum(c1, 0), tl.sum(c2, 0), tl.sum(c3, 0)


@triton.jit
def _write_selected(S, V, IDX, s_base, v_base, out_base, length, tau, filled, limit, EQUAL: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Append (in position order) the candidates with key > tau, or == tau (at most `limit` of them),
    to IDX[out_base + filled ...]; returns the new fill."""
    taken = tl.full((), 0, tl.int32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < length
        s = tl.load(S + s_base + offs, mask=inb, other=0.0).to(tl.float32)
        ok = inb & (tl.load(V + v_base + offs, mask=inb, other=0) != 0)
        key = _sortable(s)
        if EQUAL:
            sel = ok & (key == tau)
        else:
            sel = ok & (key > tau)
        rank = tl.cumsum(sel.to(tl.int32), 0)  # 1-based among this block's selections
        sel = sel & (taken + rank <= limit)
        tl.store(IDX + out_base + filled + taken + rank - 1, offs.to(tl.int64), mask=sel)
        taken += tl.sum(sel.to(tl.int32), 0)
    return filled + taken


@triton.jit
def _prefix_route(S, V, IDX, A, EPS, T, N, R, W, K, budget_cap, n_iters, BLOCK: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (b * R + r) * N + n
    n = pid % N
    br = pid // N
    s_base = br * T
    v_base = (br // R) * T
    length = tl.minimum(n * W, T).to(tl.int32)
    count, _ = _row_stats(S, V, s_base, v_base, length, BLOCK)
    kk = tl.minimum(count, K)
    # The k-th largest key: count(key >= lo) >= kk holds, count(key >= hi) < kk; each pass splits
    # [lo, hi) in four (2^32 keys: 16 passes).
    lo = tl.full((), -(1 << 31), tl.int64)
    hi = tl.full((), 1 << 31, tl.int64)
    for _ in range(0, 16):
        q = (hi - lo) // 4
        c1, c2, c3 = _count_at_least(S, V, s_base, v_base, length, lo + q, lo + 2 * q, lo + 3 * q, BLOCK)
        new_lo = tl.where(c3 >= kk, lo + 3 * q, tl.where(c2 >= kk, lo + 2 * q, tl.where(c1 >= kk, lo + q, lo)))
        new_hi = tl.where(c3 >= kk, hi, tl.where(c2 >= kk, lo + 3 * q, tl.where(c1 >= kk, lo + 2 * q, lo + q)))
        lo, hi = new_lo, new_hi
    out_base = pid * K
    filled = _write_selected(S, V, IDX, s_base, v_base, out_base, length, lo, 0, kk, False, BLOCK)
    filled = _write_selected(S, V, IDX, s_base, v_base, out_base, length, lo, filled, kk - filled, True, BLOCK)
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        tl.store(IDX + out_base + offs, tl.full((BLOCK_K,), 0, tl.int64) + T, mask=(offs >= kk) & (offs < K))
    budget = tl.minimum(count.to(tl.float32), budget_cap)
    logk = tl.log(tl.maximum(budget, 1e-20))
    a = _dual(S, V, s_base, v_base, length, logk, EPS, A, 0, n_iters, False, BLOCK)
    tl.store(A + pid, a)


def _block(length: int) -> int:
    return max(16, min(2048, triton.next_power_of_2(max(length, 1))))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


class WindowDual(torch.autograd.Function):
    """a (rows,) of coordinate descent over each row of s2d (rows, W) float32, differentiable in s2d."""

    @staticmethod
    def forward(ctx, s2d, valid2d, logk, eps_list, n_iters):
        rows, w = s2d.shape
        eps_sched = eps_tensor(eps_list, s2d.device)
        a = torch.empty((rows,), dtype=torch.float32, device=s2d.device)
        ysum = torch.empty((rows,), dtype=torch.float32, device=s2d.device)
        stats = torch.empty((rows, n_iters, 3), dtype=torch.float32, device=s2d.device)
        block = _block(w)
        if rows:
            _window_dual_fwd[(rows,)](s2d, valid2d, logk, eps_sched, a, stats, ysum, w, n_iters, BLOCK=block,
                                      num_warps=_warps(block))
        ctx.save_for_backward(s2d, valid2d, stats, eps_sched)
        ctx.n_iters = n_iters
        ctx.mark_non_differentiable(ysum)
        return a, ysum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_a, grad_ysum):
        s2d, valid2d, stats, eps_sched = ctx.saved_tensors
        rows, w = s2d.shape
        ds = torch.empty((rows, w), dtype=s2d.dtype, device=s2d.device)
        block = _block(w)
        if rows:
            _window_dual_bwd[(rows,)](s2d, valid2d, stats, eps_sched, grad_a.float().contiguous(), ds, w,
                                      ctx.n_iters, BLOCK=block, num_warps=_warps(block))
        return ds, None, None, None, None


def _check_scores(s: torch.Tensor) -> None:
    if s.dtype != torch.float32:
        raise TypeError(f"router scores: the kernels take float32 (routing runs in float32), got {s.dtype}")


def window_dual_triton(s: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, n_iters: int, eps: float,
                       eps_init: float | None, eps_decay: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """s, valid: (..., W) float32 / bool; budget (...) -> (a (..., 1) differentiable in s, eps_final,
    row sums (...) of exp(min(s + a, 0) / eps_final) over the candidates)."""
    _check_scores(s)
    lead, w = s.shape[:-1], s.shape[-1]
    s2d = s.reshape(-1, w).contiguous()
    valid2d = valid.expand(s.shape).reshape(-1, w).contiguous().view(torch.uint8)
    logk = budget.to(torch.float32).reshape(-1).clamp(min=1e-20).log().contiguous()
    schedule = eps_schedule(n_iters, eps, eps_init, eps_decay)
    a, ysum = WindowDual.apply(s2d, valid2d, logk, schedule, n_iters)
    return a.view(*lead, 1), schedule[-1], ysum.view(lead)


@torch.no_grad()
def prefix_route_triton(s: torch.Tensor, valid: torch.Tensor, window: int, k: int, n_iters: int, eps: float,
                        eps_init: float | None, eps_decay: float, fetch_ratio: float
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """s: (B, R, T) float32 scores, valid: (B, T) bool. For window n (N = ceil(T / window) of them): the
    top-k candidates among positions < n * window, (B, R, N, k) int64 in position order, T for an
    empty slot; and the prefix's dual a (B, R, N, 1) with budget min(candidates, k * fetch_ratio)."""
    _check_scores(s)
    b, r, t = s.shape
    n = -(-t // window)
    s = s.contiguous()
    valid = valid.to(torch.bool).contiguous().view(torch.uint8)
    schedule = eps_schedule(n_iters, eps, eps_init, eps_decay)
    idx = torch.empty((b, r, n, k), dtype=torch.int64, device=s.device)
    a = torch.empty((b, r, n, 1), dtype=torch.float32, device=s.device)
    block = _block(t)
    if b * r * n:
        _prefix_route[(b * r * n,)](s, valid, idx, a, eps_tensor(schedule, s.device), t, n, r, window, k,
                                    float(k * fetch_ratio), n_iters, BLOCK=block,
                                    BLOCK_K=triton.next_power_of_2(k), num_warps=_warps(block))
    return idx, a, schedule[-1]
