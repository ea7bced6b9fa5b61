"""Triton coordinate descent over (rows, n) scores: no cap on n, long rows split across programs.

Math (see reference.py). With eps_t the epsilon of iteration t (t = 0 .. n_iters-1), eps_f = the one
after the last decay, and a_{-1} undefined:

    c_t  = 0 (t = 0),  min(s, -a_{t-1}) (t >= 1)            one value per entry
    lse_t = logsumexp_j(c_t / eps_t) over the candidates      one scalar per row
    a_t  = eps_t * (log k - lse_t)
    y    = exp(min(s + a_{n-1}, 0) / eps_f)

Forward: a row is cut into chunks of `chunk_len`, one program each. Per iteration every program writes
a partial (max, sum of exp, saturated mass) of its chunk; the row's programs then combine the row's
partials into a_t (a two-stage logsumexp). On a GPU, when all programs fit on the chip at once, one
launch runs every iteration and the row's programs meet at a counter in global memory after each one
("cooperative"); otherwise (and in the interpreter, which runs programs one after another) each
iteration is one launch and the next launch combines the partials.

Backward (exact gradient of the unrolled iterations, recomputed, nothing per entry stored): the forward
keeps three scalars per row and iteration: a_t, lse_t and P_t = softmax mass of iteration t on the
saturated entries (s + a_{t-1} > 0). With g = dL/dy and abar_t = dL/da_t:

    abar_{n-1} = sum_j g_j y_j [s_j + a_{n-1} <= 0] / eps_f               (one reduction)
    abar_{t-1} = abar_t * P_t                                             (scalar recursion)
    ds_j = g_j y_j [s_j + a_{n-1} <= 0] / eps_f
           - sum_{t>=1} abar_t exp(s_j / eps_t - lse_t) [s_j + a_{t-1} <= 0]   (elementwise)
    dlog k = sum_t abar_t eps_t

Implicit differentiation at the fixed point (sum_j exp(min(s_j + a, 0)/eps) = k) instead gives
ds_j = direct_j - abar y_j [unsat_j] / sum_unsat y; it equals the above only once converged. Measured on
an H100 (docs/benchmarks.md) it is no faster (both backwards are two launches over the
scores) and off by 3.5e-4 .. 3.7e-2 (relative) against the reference's gradient at 50 iterations, so
the exact unrolled gradient is the default; implicit_backward=True is kept for comparison.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def eps_schedule(n_iters: int, eps: float, eps_init: float | None, eps_decay: float) -> list[float]:
    """eps of each iteration, then the final one (after the last decay), exactly as the reference."""
    cur = max(eps_init if eps_init is not None else eps, eps)
    out = []
    for _ in range(n_iters):
        out.append(cur)
        cur = max(cur * eps_decay, eps)
    return out + [cur]


@triton.jit
def _chunk(pid, n_chunks, chunk_len, n):
    """Program pid's row, its chunk of that row, the row's offset (int64: rows * n may pass 2**31) and
    the chunk's [start, end) within the row."""
    row = pid // n_chunks
    chunk = pid % n_chunks
    start = chunk * chunk_len
    return row, chunk, row.to(tl.int64) * n, start, tl.minimum(start + chunk_len, n)


@triton.jit
def _chunk_partial(S, MASK, s_base, m_base, start, end, a_prev, inv_eps, t,
                   HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """(max z, sum exp(z - max), saturated part of that sum) over entries [start, end) of a row."""
    m_run = tl.full((), float("-inf"), tl.float32)
    l_run = tl.full((), 0.0, tl.float32)
    sat_run = tl.full((), 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        valid = idx < end
        s = tl.load(S + s_base + idx, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = valid & (tl.load(MASK + m_base + idx, mask=valid, other=0) != 0)
        c = tl.where(t == 0, 0.0, tl.minimum(s, -a_prev))  # iteration 0: b = -s, so s + b = 0
        z = tl.where(valid, c * inv_eps, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        n_sat = tl.sum(tl.where(valid & (s + a_prev > 0) & (t > 0), 1.0, 0.0), 0)
        l_run = l_run * alpha + tl.sum(tl.exp(z - m_safe), 0)
        sat_run = sat_run * alpha + n_sat * tl.exp(-a_prev * inv_eps - m_safe)
        m_run = m_new
    return m_run, l_run, sat_run


@triton.jit
def _finish_and_record(m_all, l_sum, sat_sum, STATS, row, chunk, t, n_iters, eps_t, logk):
    """a_t from a row's (max, sum exp(z - max), saturated part); chunk 0 records (a_t, lse_t, P_t)."""
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    has = l_sum > 0  # False only for a row with no candidate: its outputs are masked to 0 anyway
    lse = tl.where(has, m_safe + tl.log(tl.where(has, l_sum, 1.0)), 0.0)
    p_sat = tl.where(has, sat_sum / tl.where(has, l_sum, 1.0), 0.0)
    a_t = eps_t * (logk - lse)
    st = STATS + (row * n_iters + t) * 3
    is_first_chunk = chunk == 0
    tl.store(st, a_t, mask=is_first_chunk)
    tl.store(st + 1, lse, mask=is_first_chunk)
    tl.store(st + 2, p_sat, mask=is_first_chunk)
    return a_t


@triton.jit
def _combine_and_record(PART, STATS, row, chunk, t, n_chunks, n_iters, eps_t, logk, NC: tl.constexpr):
    """Combine iteration t's partials of one row (from global memory) into a_t."""
    idx = tl.arange(0, NC)
    ok = idx < n_chunks
    base = (row * n_iters + t) * n_chunks * 3
    m = tl.load(PART + base + idx * 3, mask=ok, other=float("-inf"), volatile=True)
    l_part = tl.load(PART + base + idx * 3 + 1, mask=ok, other=0.0, volatile=True)
    sat_part = tl.load(PART + base + idx * 3 + 2, mask=ok, other=0.0, volatile=True)
    m_all = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    return _finish_and_record(m_all, tl.sum(l_part * w, 0), tl.sum(sat_part * w, 0), STATS, row, chunk, t,
                              n_iters, eps_t, logk)


SINGLE, COOPERATIVE, PER_ITERATION = 0, 1, 2  # forward modes


@triton.jit
def _forward_kernel(S, MASK, LOGK, EPS, Y, STATS, PART, COUNTER,
                    n, n_chunks, chunk_len, n_iters, t_begin, t_end,
                    HAS_MASK: tl.constexpr, MODE: tl.constexpr, FINAL: tl.constexpr, NC: tl.constexpr,
                    BLOCK: tl.constexpr):
    """MODE 0: one program per row, all iterations. MODE 1: all iterations, the row's programs meet at
    a counter after each. MODE 2: iterations [t_begin, t_end) of a sequence of launches."""
    pid = tl.program_id(0)
    row, chunk, base, start, end = _chunk(pid, n_chunks, chunk_len, n)
    logk = tl.load(LOGK + row)
    a = logk * 0.0
    if MODE == 2:
        if t_begin > 0:  # a new launch continues: combine the previous launch's partials
            a = _combine_and_record(PART, STATS, row, chunk, t_begin - 1, n_chunks, n_iters,
                                    tl.load(EPS + t_begin - 1), logk, NC)
    for t in range(t_begin, t_end):
        eps_t = tl.load(EPS + t)
        m_run, l_run, sat_run = _chunk_partial(S, MASK, base, base, start, end, a, 1.0 / eps_t, t,
                                               HAS_MASK, BLOCK)
        if MODE == 0:
            a = _finish_and_record(m_run, l_run, sat_run, STATS, row, chunk, t, n_iters, eps_t, logk)
        else:
            part = PART + ((row * n_iters + t) * n_chunks + chunk) * 3
            tl.store(part, m_run)
            tl.store(part + 1, l_run)
            tl.store(part + 2, sat_run)
            if MODE == 1:
                # every program of the row must have written iteration t: a counter in global memory.
                tl.debug_barrier()  # this program's stores happen before its arrival is counted
                tl.atomic_add(COUNTER + row, 1, sem="release")
                target = n_chunks * (t + 1)
                seen = tl.atomic_add(COUNTER + row, 0, sem="acquire")
                while seen < target:
                    seen = tl.atomic_add(COUNTER + row, 0, sem="acquire")
                tl.debug_barrier()
                a = _combine_and_record(PART, STATS, row, chunk, t, n_chunks, n_iters, eps_t, logk, NC)
    if FINAL:
        inv_eps_f = 1.0 / tl.load(EPS + n_iters)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            inb = idx < end
            s = tl.load(S + base + idx, mask=inb, other=0.0).to(tl.float32)
            y = tl.exp(tl.minimum(s + a, 0.0) * inv_eps_f)
            if HAS_MASK:
                y = tl.where(tl.load(MASK + base + idx, mask=inb, other=0) != 0, y, 0.0)
            tl.store(Y + base + idx, y.to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _final_weights(S, MASK, G, base, idx, end, a_last, inv_eps_f, HAS_MASK: tl.constexpr):
    """One block of a row in the backward: scores s, incoming gradient g, the candidates (in the row,
    not masked) and the final weights y, nonzero only where unsaturated (s + a_last <= 0)."""
    valid = idx < end
    s = tl.load(S + base + idx, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(G + base + idx, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASK:
        valid = valid & (tl.load(MASK + base + idx, mask=valid, other=0) != 0)
    y = tl.where(valid & (s + a_last <= 0), tl.exp(tl.minimum(s + a_last, 0.0) * inv_eps_f), 0.0)
    return s, g, valid, y


@triton.jit
def _backward_reduce_kernel(S, MASK, G, STATS, EPS, BPART, n, n_chunks, chunk_len, n_iters,
                            HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: sum of g*y and of y over unsaturated candidates."""
    pid = tl.program_id(0)
    row, chunk, base, start, end = _chunk(pid, n_chunks, chunk_len, n)
    a_last = tl.load(STATS + (row * n_iters + n_iters - 1) * 3)
    inv_eps_f = 1.0 / tl.load(EPS + n_iters)
    acc_gy = tl.zeros((BLOCK,), tl.float32)
    acc_y = tl.zeros((BLOCK,), tl.float32)
    for off in range(start, end, BLOCK):
        _, g, _, y = _final_weights(S, MASK, G, base, off + tl.arange(0, BLOCK), end, a_last, inv_eps_f, HAS_MASK)
        acc_gy += g * y
        acc_y += y
    tl.store(BPART + pid * 2, tl.sum(acc_gy, 0))
    tl.store(BPART + pid * 2 + 1, tl.sum(acc_y, 0))


@triton.jit
def _backward_grad_kernel(S, MASK, G, STATS, EPS, LOGK, BPART, DS, DLOGK, n, n_chunks, chunk_len,
                          N_ITERS: tl.constexpr, HAS_MASK: tl.constexpr, IMPLICIT: tl.constexpr,
                          NC: tl.constexpr, BLOCK: tl.constexpr):
    """d scores of one chunk, and d log k of the row (chunk 0)."""
    pid = tl.program_id(0)
    row, chunk, base, start, end = _chunk(pid, n_chunks, chunk_len, n)
    pidx = tl.arange(0, NC)
    pok = pidx < n_chunks
    sum_gy = tl.sum(tl.load(BPART + (row * n_chunks + pidx) * 2, mask=pok, other=0.0), 0)
    sum_y = tl.sum(tl.load(BPART + (row * n_chunks + pidx) * 2 + 1, mask=pok, other=0.0), 0)
    stats = STATS + row * N_ITERS * 3
    a_last = tl.load(stats + (N_ITERS - 1) * 3)
    eps_f = tl.load(EPS + N_ITERS)
    inv_eps_f = 1.0 / eps_f
    abar_last = sum_gy * inv_eps_f  # dL/da_{n-1}
    inv_sum_y = tl.where(sum_y > 0, 1.0 / tl.where(sum_y > 0, sum_y, 1.0), 0.0)
    if IMPLICIT:
        dlogk = abar_last * eps_f * tl.exp(tl.load(LOGK + row)) * inv_sum_y
    else:
        dlogk = abar_last * 0.0
        abar = abar_last
        for i in range(N_ITERS):
            t = N_ITERS - 1 - i
            dlogk += abar * tl.load(EPS + t)
            abar = abar * tl.load(stats + t * 3 + 2)
    tl.store(DLOGK + row, dlogk, mask=chunk == 0)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        s, g, valid, y = _final_weights(S, MASK, G, base, idx, end, a_last, inv_eps_f, HAS_MASK)
        ds = g * y * inv_eps_f
        if IMPLICIT:
            ds -= abar_last * y * inv_sum_y
        else:
            abar = abar_last
            for j in range(N_ITERS - 1):  # iterations t = n-1 .. 1; iteration 0 does not see s
                t = N_ITERS - 1 - j
                a_prev = tl.load(stats + (t - 1) * 3)
                lse_t = tl.load(stats + t * 3 + 1)
                inv_eps_t = 1.0 / tl.load(EPS + t)
                p = tl.exp(tl.minimum(s, -a_prev) * inv_eps_t - lse_t)
                ds -= tl.where(valid & (s + a_prev <= 0), abar * p, 0.0)
                abar = abar * tl.load(stats + t * 3 + 2)
        tl.store(DS + base + idx, tl.where(valid, ds, 0.0).to(DS.dtype.element_ty), mask=idx < end)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2_at_least_2(x: int) -> int:
    return max(2, triton.next_power_of_2(x))


def _block_for(length: int, block: int | None) -> int:
    return block or max(128, min(2048, triton.next_power_of_2(length)))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


_EPS_TENSORS: dict = {}


def eps_tensor(eps_list: list[float], device: torch.device) -> torch.Tensor:
    """The schedule on the device, cached: a fresh host-to-device copy per call would synchronise."""
    key = (tuple(eps_list), str(device))
    cached = _EPS_TENSORS.get(key)
    if cached is None:
        if len(_EPS_TENSORS) > 256:
            _EPS_TENSORS.clear()
        cached = _EPS_TENSORS[key] = torch.tensor(eps_list, dtype=torch.float32, device=device)
    return cached


def forward_plan(rows: int, n: int, device: torch.device, block: int | None, chunk_len: int | None,
                 cooperative: bool | None) -> tuple[int, int, int]:
    """(block, chunk_len, mode). A row is split only when rows alone cannot fill the GPU. Mode
    COOPERATIVE (one launch, programs meet at a counter) needs every program resident at once, so
    only on a GPU and only with grid <= multiprocessors; else one launch per iteration."""
    sms = _num_sms(device)
    if chunk_len is None:
        n_chunks = 1 if rows * 2 > sms else max(1, min(triton.cdiv(n, _block_for(n, block)), sms // rows))
        chunk_len = triton.cdiv(n, n_chunks)
    block = _block_for(chunk_len, block)
    chunk_len = triton.cdiv(chunk_len, block) * block
    n_chunks = triton.cdiv(n, chunk_len)
    if n_chunks == 1:
        return block, chunk_len, SINGLE
    coop_ok = sms > 0 and rows * n_chunks <= sms and cooperative is not False
    return block, chunk_len, COOPERATIVE if coop_ok else PER_ITERATION


def rows_forward(s2d: torch.Tensor, mask2d: torch.Tensor | None, logk: torch.Tensor, eps_sched: torch.Tensor,
                 n_iters: int, block: int | None = None, chunk_len: int | None = None,
                 cooperative: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y (rows, n) in s2d's dtype and stats (rows, n_iters, 3) float32 = (a_t, lse_t, P_t)."""
    rows, n = s2d.shape
    block, chunk_len, mode = forward_plan(rows, n, s2d.device, block, chunk_len, cooperative)
    n_chunks = triton.cdiv(n, chunk_len)
    dev = s2d.device
    y = torch.empty((rows, n), dtype=s2d.dtype, device=dev)
    stats = torch.empty((rows, n_iters, 3), dtype=torch.float32, device=dev)
    part = torch.empty((rows, n_iters, n_chunks, 3) if mode != SINGLE else (1,), dtype=torch.float32,
                       device=dev)
    counter = torch.zeros((rows,), dtype=torch.int32, device=dev) if mode == COOPERATIVE else part
    mask_arg = mask2d if mask2d is not None else s2d
    common = dict(HAS_MASK=mask2d is not None, NC=_pow2_at_least_2(n_chunks), BLOCK=block,
                  num_warps=_warps(block))
    args = (s2d, mask_arg, logk, eps_sched, y, stats, part, counter, n, n_chunks, chunk_len, n_iters)
    grid = (rows * n_chunks,)
    if mode != PER_ITERATION:
        _forward_kernel[grid](*args, 0, n_iters, MODE=mode, FINAL=True, **common)
    else:
        for t in range(n_iters):
            _forward_kernel[grid](*args, t, t + 1, MODE=mode, FINAL=False, **common)
        _forward_kernel[grid](*args, n_iters, n_iters, MODE=mode, FINAL=True, **common)
    return y, stats


def rows_backward(s2d, mask2d, logk, eps_sched, stats, grad_y, n_iters: int, implicit: bool = False,
                  block: int | None = None, chunk_len: int | None = None):
    """(d scores (rows, n) in s2d's dtype, d log k (rows,) float32)."""
    rows, n = s2d.shape
    dev = s2d.device
    if chunk_len is None:  # no co-residency needed here: aim for ~4 programs per multiprocessor
        per_row = max(1, min(triton.cdiv(n, _block_for(n, block)), triton.cdiv(4 * max(_num_sms(dev), 1), rows)))
        chunk_len = triton.cdiv(n, per_row)
    block = _block_for(chunk_len, block)
    chunk_len = triton.cdiv(chunk_len, block) * block
    n_chunks = triton.cdiv(n, chunk_len)
    grad_y = grad_y.contiguous()
    mask_arg = mask2d if mask2d is not None else s2d
    bpart = torch.empty((rows, n_chunks, 2), dtype=torch.float32, device=dev)
    ds = torch.empty((rows, n), dtype=s2d.dtype, device=dev)
    dlogk = torch.empty((rows,), dtype=torch.float32, device=dev)
    grid = (rows * n_chunks,)
    warps = _warps(block)
    _backward_reduce_kernel[grid](s2d, mask_arg, grad_y, stats, eps_sched, bpart, n, n_chunks, chunk_len,
                                  n_iters, HAS_MASK=mask2d is not None, BLOCK=block, num_warps=warps)
    _backward_grad_kernel[grid](s2d, mask_arg, grad_y, stats, eps_sched, logk, bpart, ds, dlogk, n, n_chunks,
                                chunk_len, N_ITERS=n_iters, HAS_MASK=mask2d is not None, IMPLICIT=implicit,
                                NC=_pow2_at_least_2(n_chunks), BLOCK=block, num_warps=warps)
    return ds, dlogk


class CoorDescentRows(torch.autograd.Function):
    """y = coordinate descent on (rows, n) scores; differentiable in the scores and log k."""

    @staticmethod
    def forward(ctx, s2d, logk, mask2d, eps_list, n_iters, implicit, block, chunk_len, cooperative):
        eps_sched = eps_tensor(eps_list, s2d.device)
        y, stats = rows_forward(s2d, mask2d, logk, eps_sched, n_iters, block, chunk_len, cooperative)
        ctx.save_for_backward(s2d, logk, eps_sched, stats, *(() if mask2d is None else (mask2d,)))
        ctx.config = (n_iters, implicit, block)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        s2d, logk, eps_sched, stats, *maybe_mask = ctx.saved_tensors
        n_iters, implicit, block = ctx.config
        ds, dlogk = rows_backward(s2d, maybe_mask[0] if maybe_mask else None, logk, eps_sched, stats,
                                  grad_y, n_iters, implicit, block)
        return ds, dlogk, None, None, None, None, None, None, None


def coor_descent_triton(scores: torch.Tensor, k: float | torch.Tensor, n_iters: int, eps: float,
                        eps_init: float | None = None, eps_decay: float = 1.0,
                        mask: torch.Tensor | None = None, *, implicit_backward: bool = False,
                        block: int | None = None, chunk_len: int | None = None,
                        cooperative: bool | None = None) -> torch.Tensor:
    """Same semantics as coor_descent_reference; scores (..., n) float16/bfloat16/float32 on CUDA
    (or on the CPU under TRITON_INTERPRET=1). Accumulates in float32; y in the scores' dtype.

    implicit_backward: gradients by implicit differentiation at the fixed point instead of the exact
    gradient of the unrolled iterations. block / chunk_len / cooperative: tiling overrides (tests)."""
    if n_iters < 1:
        raise ValueError(f"n_iters: must be >= 1, got {n_iters}")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    if scores.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"scores: dtype {scores.dtype} not supported; allowed: float16, bfloat16, float32")
    if scores.shape[-1] < 1:
        raise ValueError(f"scores: the last dimension (n) must be >= 1, got shape {tuple(scores.shape)}")
    lead, n = scores.shape[:-1], scores.shape[-1]
    s2d = scores.reshape(-1, n).contiguous()  # (rows, n)
    rows = s2d.shape[0]
    mask2d = None
    if mask is not None:
        if mask.shape != scores.shape:
            mask = mask.expand(scores.shape)
        mask2d = mask.reshape(rows, n).contiguous().view(torch.uint8)  # (rows, n)
    if isinstance(k, torch.Tensor):
        k_rows = k.to(device=scores.device, dtype=torch.float32).expand(lead).reshape(rows)
        logk = k_rows.clamp(min=1e-20).log()
    else:
        if not k > 0:
            raise ValueError(f"k: must be > 0, got {k}")
        logk = torch.full((rows,), math.log(k), dtype=torch.float32, device=scores.device)
    eps_list = eps_schedule(n_iters, eps, eps_init, eps_decay)
    y = CoorDescentRows.apply(s2d, logk, mask2d, eps_list, n_iters, implicit_backward, block, chunk_len,
                              cooperative)
    return y.reshape(scores.shape)
