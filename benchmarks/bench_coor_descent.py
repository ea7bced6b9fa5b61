"""Coordinate descent on a GPU: our Triton kernels vs the PyTorch reference and colt5-attention's kernel.

    PYTHONPATH=. python benchmarks/bench_coor_descent.py --check     # correctness at real sizes
    PYTHONPATH=. python benchmarks/bench_coor_descent.py             # timing table (forward+backward)

Times are medians of CUDA-event timings of forward+backward, L2 flushed before each run; peak is the
extra GPU memory (torch allocator high-water mark over the inputs) of one forward+backward. colt5 is
colt5-attention's `triton_coor_descent` when importable; its attention path is its kernel on dense
fp32 q.k scores, as colt5-style coordinate-descent attention does. Never gates CI.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import traceback

import torch

from attention.coor_descent.kernel import coor_descent_attention_triton, coor_descent_triton
from attention.coor_descent.reference import coor_descent_attention_reference, coor_descent_reference
from benchmarks.timing import median_ms, peak_mib

try:
    from colt5_attention.triton_coor_descent import triton_coor_descent as colt5_coor_descent
except Exception as err:  # not installed, or broken on this torch/triton
    print(f"colt5-attention not available: {err!r}")
    colt5_coor_descent = None

DEV = "cuda"


def time_fwd_bwd(make_inputs, op, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms of forward+backward with the L2 flushed first, peak extra MiB of one run)."""
    inputs, grad = make_inputs()
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def run():
        for x in leaves:
            x.grad = None
        out = op(*inputs)
        if out.requires_grad:
            out.backward(grad)

    ms = median_ms(run, warmup=warmup, iters=reps, device=DEV)
    return ms, peak_mib(run, DEV)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------- correctness

TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 3e-2)}


def report(name: str, dtype, errs: dict[str, float], failures: list[str], info: bool = False) -> None:
    """info: a measurement (the implicit gradient is an approximation), not a pass/fail check."""
    tol_out, tol_grad = TOL[dtype]
    bad = [k for k, e in errs.items() if not e <= (tol_out if k in ("y", "out") else tol_grad)]
    text = "  ".join(f"{k} {e:.1e}" for k, e in errs.items())
    print(f"{'info' if info else 'FAIL' if bad else 'ok  '} {name} [{str(dtype)[6:]}]: {text}", flush=True)
    if bad and not info:
        failures.append(name)


def _check_rows(rows, n, k, n_iters, eps, dtype, failures, eps_init=None, eps_decay=1.0, masked=False,
               per_row_k=False, **kw):
    s = torch.randn(rows, n, device=DEV).to(dtype)
    mask = (torch.rand(rows, n, device=DEV) > 0.1) if masked else None
    kk = torch.randint(k // 4, k + 1, (rows,), device=DEV).float() if per_row_k else k
    s64 = s.double().requires_grad_()
    k64 = kk.double().requires_grad_() if per_row_k else kk
    y_ref = coor_descent_reference(s64, k64, n_iters, eps, eps_init, eps_decay, mask)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    s_t = s.clone().requires_grad_()
    k_t = kk.clone().requires_grad_() if per_row_k else kk
    y = coor_descent_triton(s_t, k_t, n_iters, eps, eps_init, eps_decay, mask, **kw)
    y.backward(g.to(dtype))
    errs = {"y": rel_err(y, y_ref), "ds": rel_err(s_t.grad, s64.grad)}
    if per_row_k:
        errs["dk"] = rel_err(k_t.grad, k64.grad)
    report(f"rows {rows}x{n} k{k} {n_iters}it mask={masked} per_row_k={per_row_k} {kw}", dtype, errs, failures,
           info=kw.get("implicit_backward", False))


def _check_attention(b, t, s, h, d, k, n_iters, eps, dtype, causal, key_mask, failures, tiles=None, **kw):
    q, kk, v = (torch.randn(b, n, h, d, device=DEV).to(dtype) for n in (t, s, s))
    km = (torch.rand(b, s, device=DEV) > 0.2) if key_mask else None
    args = dict(topk=k, n_iters=n_iters, eps=eps, causal=causal, key_mask=km, **kw)
    ref_in = [x.double().requires_grad_() for x in (q, kk, v)]
    out_ref = coor_descent_attention_reference(*ref_in, **args)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    ins = [x.clone().requires_grad_() for x in (q, kk, v)]
    out = coor_descent_attention_triton(*ins, tiles=tiles, **args)
    out.backward(g.to(dtype))
    errs = {"out": rel_err(out, out_ref)}
    errs.update({f"d{nm}": rel_err(x.grad, r.grad) for nm, x, r in zip("qkv", ins, ref_in)})
    report(f"attention B{b} T{t} S{s} H{h} D{d} k{k} {n_iters}it causal={causal} key_mask={key_mask} {kw} "
           f"{tiles or ''}",
           dtype, errs, failures)
    del ref_in, out_ref
    torch.cuda.empty_cache()


def guarded(fn, failures: list[str]):
    """Run one check; an exception (e.g. a kernel that fails to compile) is a failure, not the end."""
    def run(*args, **kw):
        try:
            return fn(*args, failures=failures, **kw)
        except Exception:
            traceback.print_exc()
            failures.append(f"{fn.__name__}{args}")
            torch.cuda.empty_cache()
    return run


def run_checks() -> list[str]:
    torch.manual_seed(0)
    failures: list[str] = []
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    check_rows, check_attention = guarded(_check_rows, failures), guarded(_check_attention, failures)
    check_rows(16, 32768, 1024, 50, 0.1, f32)
    check_rows(16, 32768, 1024, 50, 0.1, f32, cooperative=False)
    check_rows(4, 131072, 4096, 50, 0.05, f32, eps_init=1.0, eps_decay=0.8, masked=True,
               per_row_k=True)
    check_rows(16, 32768, 1024, 50, 0.1, bf16)
    check_rows(2, 2**20 + 7, 8192, 20, 0.1, f32, masked=True)
    check_rows(4096, 1000, 50, 20, 0.1, f16, per_row_k=True)
    check_rows(16, 32768, 1024, 50, 0.1, f32, implicit_backward=True)
    check_rows(16, 32768, 1024, 50, 0.03, f32, eps_init=1.0, eps_decay=0.8, implicit_backward=True)
    check_rows(4, 131072, 4096, 50, 0.1, f32, implicit_backward=True)
    check_attention(2, 1000, 1000, 2, 64, 64, 20, 0.1, bf16, True, False)
    check_attention(2, 777, 1025, 2, 64, 64, 20, 0.05, f16, False, True, eps_init=1.0, eps_decay=0.8)
    check_attention(1, 513, 513, 3, 60, 32, 10, 0.1, f32, True, True)
    check_attention(1, 2048, 2048, 2, 64, 64, 20, 0.1, bf16, False, False)
    check_attention(1, 1031, 2048, 2, 128, 100, 12, 0.1, f16, True, False)
    check_attention(1, 4096, 4096, 1, 64, 256, 20, 0.01, bf16, True, False)
    check_attention(1, 999, 1000, 2, 64, 64, 20, 0.1, bf16, True, True, tiles={"exp_limit": -1e30})
    print("checks:", "all passed" if not failures else f"{len(failures)} FAILED: {failures}", flush=True)
    return failures


# ---------------------------------------------------------------------------------------------- timing

TILES: dict = {}  # attention tile overrides for "ours", set by --tune


def tune_attention() -> dict:
    """Pick the forward tiles by forward time, then the backward tiles by forward+backward time, at
    T 8192, 8 heads, d 64, k 256, 20 iterations, bf16."""
    t, h, d = 8192, 8, 64
    q, k, v = (torch.randn(1, t, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn_like(q)
    args = dict(topk=256, n_iters=20, eps=0.1)

    def tile(bm, bn, w):
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w)

    def measure(tiles, backward):
        def run():
            ins = [x.requires_grad_(backward) for x in (q, k, v)]
            out = coor_descent_attention_triton(*ins, tiles=tiles, **args)
            if backward:
                out.backward(grad)
        try:
            return median_ms(run, warmup=1, iters=3, device=DEV, flush_l2=False)
        except Exception as err:
            print(f"tiles {tiles} failed: {type(err).__name__}: {str(err)[:200]}")
            return float("inf")

    best = {}
    fwd = {c: measure({"fwd": tile(*c)}, False) for c in [(128, 128, 8), (128, 64, 8)]}
    best["fwd"] = tile(*min(fwd, key=fwd.get))
    print("tune forward ms:", {str(c): round(ms, 3) for c, ms in fwd.items()}, flush=True)
    candidates = [((64, 64, 8), (64, 32, 8), 1), ((64, 64, 8), (64, 32, 8), 4), ((128, 32, 8), (64, 32, 8), 4)]
    bwd = {c: measure({**best, "bwd_m": tile(*c[0]), "bwd_n": tile(*c[1]), "unroll": c[2]}, True)
           for c in candidates}
    print("tune fwd+bwd ms (bwd_m, bwd_n, unroll):", {str(c): round(ms, 3) for c, ms in bwd.items()}, flush=True)
    cm, cn, unroll = min(bwd, key=bwd.get)
    best.update(bwd_m=tile(*cm), bwd_n=tile(*cn), unroll=unroll)
    print("tiles chosen:", best, flush=True)
    return best


def time_call(fn, reps: int = 5) -> float:
    return median_ms(fn, warmup=1, iters=reps, device=DEV, flush_l2=False)


def breakdown(t: int = 8192, h: int = 8, d: int = 64, k: int = 256, n_iters: int = 20, eps: float = 0.1):
    """ms of each fused-attention kernel (bf16, tiles from --tune or the defaults): the backward with
    the factored sum over iterations (loop unrolled 1 or 4 deep) and with one exp per iteration."""
    from attention.coor_descent import kernel_attention as ka
    from attention.coor_descent.kernel_attention_bwd import AttentionBackward, grouped_start
    from attention.coor_descent.kernel_rows import eps_schedule, eps_tensor

    q, kk, v, grad = (torch.randn(1, t, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    eps_list = eps_schedule(n_iters, eps, None, 1.0)
    eps_sched = eps_tensor(eps_list, q.device)
    t_c = grouped_start(eps_list, n_iters)
    for causal in (False, True):
        cfg = {**ka.attention_config(q.dtype, d, False), **TILES}
        fwd_args = (q, kk, v, None, k, eps_sched, n_iters, d ** -0.5, causal, cfg)
        fwd_ms = time_call(functools.partial(ka.attention_forward, *fwd_args))
        out, stats, rows = ka.attention_forward(*fwd_args)
        variants = {"factored, unroll 1": {"unroll": 1}, "factored, unroll 4": {"unroll": 4},
                    "one exp per iteration": {"exp_limit": -1e30}}
        for name, extra in variants.items():
            bwd = AttentionBackward(q, kk, v, out, grad, None, stats, rows, eps_sched, t_c, n_iters, d ** -0.5,
                                    causal, {**cfg, **extra})
            parts = {"prepass": time_call(bwd.prepass), "dq": time_call(bwd.grad_q), "dkdv": time_call(bwd.grad_kv)}
            print(f"breakdown T {t} causal={causal} forward {fwd_ms:.2f} ms; backward {name}: "
                  + ", ".join(f"{kn} {ms:.2f}" for kn, ms in parts.items()) + " ms", flush=True)


def rows_case(rows, n, k, n_iters, eps=0.1):
    def make():
        return [torch.randn(rows, n, device=DEV).requires_grad_()], torch.randn(rows, n, device=DEV)

    def forward_only(s):
        with torch.no_grad():
            return coor_descent_triton(s, k, n_iters, eps)

    ops = {
        "ours": lambda s: coor_descent_triton(s, k, n_iters, eps),
        "ours (forward only)": forward_only,
        "ours (implicit bwd)": lambda s: coor_descent_triton(s, k, n_iters, eps, implicit_backward=True),
        "reference": lambda s: coor_descent_reference(s, k, n_iters, eps),
    }
    if colt5_coor_descent is not None:
        ops["colt5"] = lambda s: colt5_coor_descent(s, n_iters=n_iters, k=k, eps=eps)
    return f"rows {rows} x {n}, k {k}, {n_iters} it, fp32", make, ops


def attention_case(t, h, k, n_iters, dtype=torch.bfloat16, causal=False, eps=0.1, with_peers=True):
    d = 64
    scale = 1 / math.sqrt(d)

    def make():
        ins = [torch.randn(1, t, h, d, device=DEV, dtype=dtype).requires_grad_() for _ in range(3)]
        return ins, torch.randn(1, t, h, d, device=DEV, dtype=dtype)

    def colt5_path(q, kk, v):  # dense fp32 scores -> colt5's kernel -> normalised y @ v
        scores = torch.einsum("bthd,bshd->bhts", q.float(), kk.float()) * scale
        mask = None
        if causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=DEV).tril().expand(1, h, t, t)
        y = colt5_coor_descent(scores, n_iters=n_iters, k=k, eps=eps, mask=mask)
        out = torch.einsum("bhts,bshd->bthd", y, v.float())
        return (out / y.sum(-1).clamp(min=1e-6).transpose(1, 2)[..., None]).to(dtype)

    def reference(q, kk, v):
        return coor_descent_attention_reference(q.float(), kk.float(), v.float(), topk=k, n_iters=n_iters,
                                                eps=eps, causal=causal).to(dtype)

    def ours(q, kk, v):
        return coor_descent_attention_triton(q, kk, v, topk=k, n_iters=n_iters, eps=eps, causal=causal,
                                             tiles=TILES)

    def ours_forward(q, kk, v):
        with torch.no_grad():
            return ours(q, kk, v)

    ops = {"ours": ours, "ours (forward only)": ours_forward}
    if with_peers:
        ops["reference"] = reference
        if colt5_coor_descent is not None:
            ops["colt5"] = colt5_path
    name = f"attention T {t}, {h} heads, d {d}, k {k}, {n_iters} it, {str(dtype)[6:]}{', causal' if causal else ''}"
    return name, make, ops


def run_bench(quick: bool) -> list[tuple]:
    cases = [
        (rows_case(16, 32768, 1024, 50), 3, 20),
        (rows_case(4, 131072, 4096, 50), 3, 20),
        (rows_case(1, 2**20, 8192, 50), 2, 10),
        (attention_case(2048, 8, 64, 20), 2, 10),
        (attention_case(8192, 8, 256, 20), 1, 5),
        (attention_case(8192, 8, 256, 20, causal=True), 1, 5),
        (attention_case(32768, 8, 256, 20, with_peers=False), 1, 2),
        (attention_case(32768, 8, 256, 20, causal=True, with_peers=False), 1, 2),
    ]
    if not quick:
        cases.append((attention_case(131072, 8, 256, 20, causal=True, with_peers=False), 0, 1))
    results = []
    for (name, make, ops), warmup, reps in cases:
        for op_name, op in ops.items():
            t0 = time.time()
            try:
                ms, peak = time_fwd_bwd(make, op, warmup, reps)
            except torch.OutOfMemoryError:
                ms, peak = float("nan"), float("nan")
                op_name += " (out of memory)"
            except Exception as err:  # a peer that cannot run this shape (e.g. colt5's row cap)
                ms, peak = float("nan"), float("nan")
                op_name += f" (failed: {type(err).__name__}: {str(err)[:80]})"
            torch.cuda.empty_cache()
            results.append((name, op_name, ms, peak))
            print(f"{name:60s} {op_name:28s} {ms:10.3f} ms  peak {peak:10.1f} MiB  ({time.time() - t0:.0f} s)",
                  flush=True)
    return results


def table(results) -> str:
    ours = {name: ms for name, op, ms, _ in results if op == "ours"}
    lines = ["| case | implementation | fwd+bwd ms | peak MiB | time / ours |", "| --- | --- | --- | --- | --- |"]
    for name, op, ms, peak in results:
        ratio = ms / ours[name] if name in ours and ours[name] == ours[name] and ms == ms else float("nan")
        lines.append(f"| {name} | {op} | {ms:.3f} | {peak:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness at real sizes before timing")
    parser.add_argument("--no-bench", action="store_true", help="only the checks")
    parser.add_argument("--quick", action="store_true", help="skip the T = 128k run")
    parser.add_argument("--tune", action="store_true", help="pick attention tiles at T 8k before timing")
    parser.add_argument("--breakdown", action="store_true", help="time each attention kernel at T 8k")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}", flush=True)
    failures = run_checks() if args.check else []
    if args.tune:
        TILES.update(tune_attention())
    if args.breakdown:
        breakdown()
    if not args.no_bench:
        print(table(run_bench(args.quick)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
