"""Local (sliding-window) attention: our fused Triton kernel vs our PyTorch blocked path, dense SDPA and
flex_attention with a sliding-window block mask.

    PYTHONPATH=. python benchmarks/bench_local.py                       # H100 table, bf16, T 8k 32k 128k
    PYTHONPATH=. python benchmarks/bench_local.py --out local.json
    PYTHONPATH=. python benchmarks/bench_local.py --check               # GPU correctness vs float64, real sizes
    PYTHONPATH=. python benchmarks/bench_local.py --smoke               # CPU, seconds (kernel interpreted)

Setups: window 64, "look 1/1" (not causal: the previous, own and next window) and "causal 1/0"; B=1,
H=8, D=64; q, k, v are views of one (B, T, 3, H, D) tensor, as a fused projection gives. Variants:
  ours    local_attention(backend="triton"): attention/local/kernel.py
  torch   local_attention(backend="reference"): the blocked PyTorch path (look_around copies)
  sdpa    F.scaled_dot_product_attention over ALL keys (is_causal for causal): the cost of not being local
  flex    torch.nn.attention.flex_attention with the same window as a block mask, torch.compile'd once
          (eager and forward-only in --smoke: flex has no CPU backward)
Columns: medians of CUDA-event times (L2 flushed before each run) of forward+backward and of forward
alone (no_grad), the ratio of each to ours (> 1: ours is faster), peak extra GPU memory of one
forward+backward, GPU kernels launched (torch.profiler) by forward+backward, and at the check length the
max abs error of the output and of the gradients against our PyTorch path in float32 on the same
inputs (sdpa computes another op: no error column). Never gates CI.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before triton is imported: the kernel runs in the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention.local import local_attention, local_attention_reference  # noqa: E402
from benchmarks.timing import count_kernels, median_ms, peak_mib  # noqa: E402

SETUPS = {"look 1/1": dict(look_backward=1, look_forward=1, causal=False),
          "causal 1/0": dict(look_backward=1, look_forward=0, causal=True)}
VARIANTS = ("ours", "torch", "sdpa", "flex")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_flex(device: torch.device, compiled: bool):
    """(attend(q, k, v, setup, window) on (B, T, H, D), note); attend is None when flex does not import."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as err:
        return None, f"flex_attention not importable: {type(err).__name__}: {err}"
    for name in ("recompile_limit", "cache_size_limit"):  # one compile per (setup, T, grad mode): above 8
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if not compiled:  # the smoke run's eager flex warns that it is unfused; it is there to exercise the mask
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    # compiled, the block mask is built blockwise; eagerly it materialises a (T, T) mask (128 GiB at 128k)
    block_mask = torch.compile(create_block_mask) if compiled else create_block_mask
    masks = {}

    def attend(q, k, v, setup, window):
        t = q.shape[1]
        key = (setup, window, t)
        if key not in masks:
            lb, lf, causal = SETUPS[setup]["look_backward"], SETUPS[setup]["look_forward"], SETUPS[setup]["causal"]

            def sees(b, h, q_idx, kv_idx):  # local_band_mask, position by position
                win_q, win_k = q_idx // window, kv_idx // window
                ok = (win_k >= win_q - lb) & (win_k <= win_q + lf)
                return ok & (kv_idx <= q_idx) if causal else ok

            block = 128 if device.type == "cuda" else 16
            masks[key] = block_mask(sees, None, None, t, t, device=device, BLOCK_SIZE=block)
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[key])  # (B, H, T, D)
        return out.transpose(1, 2)

    return attend, "compiled" if compiled else "eager (smoke)"


def make_op(variant: str, setup: str, window: int, flex):
    kw = SETUPS[setup]
    if variant in ("ours", "torch"):
        backend = "triton" if variant == "ours" else "reference"
        return lambda q, k, v: local_attention(q, k, v, window_size=window, backend=backend, **kw)
    if variant == "sdpa":
        def sdpa(q, k, v):  # (B, H, T, D) views in and out
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=kw["causal"])
            return out.transpose(1, 2)
        return sdpa
    return lambda q, k, v: flex(q, k, v, setup, window)


def make_inputs(b, t, h, d, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(b, t, 3, h, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn(b, t, h, d, device=device, dtype=dtype, generator=gen)
    return qkv, grad


def errors(op, qkv: torch.Tensor, grad: torch.Tensor, setup: str, window: int) -> tuple[float, float]:
    """(max |out - ref|, max over q, k, v of max |grad - ref grad|), ref = our PyTorch path in float32."""
    x = qkv.detach().float().requires_grad_()
    ref = local_attention(*x.unbind(2), window_size=window, backend="reference", **SETUPS[setup])
    (ref_grad,) = torch.autograd.grad(ref, x, grad.float())
    y = qkv.detach().clone().requires_grad_()
    out = op(*y.unbind(2))
    (got,) = torch.autograd.grad(out, y, grad)
    return (out.float() - ref).abs().max().item(), (got.float() - ref_grad).abs().max().item()


def run_one(variant, setup, t, args, device, timer, flex) -> dict:
    entry = {"setup": setup, "T": t, "variant": variant}
    if variant == "flex" and flex is None:
        entry["error"] = "skipped: flex_attention unavailable"
        return entry
    op = make_op(variant, setup, args.window, flex)
    dtype = DTYPES[args.dtype]
    qkv, grad = make_inputs(args.batch, t, args.heads, args.dim_head, dtype, device)

    def forward():
        with torch.no_grad():  # detached too: flex refuses inputs that require grad on the CPU
            op(*qkv.detach().unbind(2))

    def fwd_bwd():
        qkv.grad = None
        op(*qkv.unbind(2)).backward(grad)

    try:
        entry["fwd_ms"] = timer(forward)
        if variant == "flex" and device.type != "cuda":
            entry["note"] = "no flex backward on the CPU"
        else:
            entry["ms"] = timer(fwd_bwd)
            entry["peak_mib"] = peak_mib(fwd_bwd, device)
            entry["kernels"] = count_kernels(fwd_bwd, device)
            entry["kernels_fwd"] = count_kernels(forward, device)
            if t == args.check_t and variant != "sdpa":
                entry["err_out"], entry["err_grad"] = errors(lambda *x: op(*x), qkv, grad, setup, args.window)
    except Exception as err:  # a row that fails (out of memory, a compile error) is reported, not fatal
        entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    finally:
        qkv.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entry


# ----------------------------------------------------------------------------------------- correctness

# relative L2 error against the float64 dense reference, per dtype: (output, gradients)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}
# (B, T, H, D, window, look_backward, look_forward, causal, dtype, key mask, fused qkv views)
CHECKS = [
    (1, 8192, 8, 64, 64, 1, 1, False, torch.bfloat16, False, True),
    (1, 8192, 8, 64, 64, 1, 0, True, torch.bfloat16, False, True),
    (2, 1025, 3, 60, 100, 2, 1, False, torch.float16, True, False),
    (2, 1000, 2, 128, 5, 2, 0, True, torch.bfloat16, True, True),
    (1, 4097, 2, 64, 64, 0, 2, False, torch.float32, True, False),
    (1, 999, 4, 16, 16, 1, 0, True, torch.float32, False, True),
    (2, 777, 2, 32, 1000, 1, 1, False, torch.float16, True, False),
]


def check_one(b, t, h, d, window, lb, lf, causal, dtype, masked, fused, device) -> tuple[bool, str]:
    gen = torch.Generator(device=device).manual_seed(t + d)
    if fused:
        leaf = torch.randn(b, t, 3, h, d, device=device, generator=gen).to(dtype).requires_grad_()
        ins = list(leaf.unbind(2))
    else:
        ins = [torch.randn(b, t, h, d, device=device, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
    key_mask = None
    if masked:
        key_mask = torch.rand(b, t, device=device, generator=gen) > 0.2
        key_mask[0, 3 * window:6 * window] = False  # a padded band: some queries see no key
    kw = dict(window_size=window, look_backward=lb, look_forward=lf, causal=causal, key_mask=key_mask)
    ref_in = [x.detach().double().requires_grad_() for x in ins]
    ref = local_attention_reference(*ref_in, **kw)
    grad = torch.randn(ref.shape, device=device, dtype=torch.float64, generator=gen)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    line, ok = [], True
    for backend in ("triton", "reference"):  # the PyTorch path in the same dtype, for scale
        out = local_attention(*ins, backend=backend, **kw)
        grads = torch.autograd.grad(out, ins, grad.to(dtype))
        errs = [(out, ref)] + list(zip(grads, ref_grads))
        rels = [((x.double() - r).norm() / r.norm().clamp(min=1e-30)).item() if torch.isfinite(x).all()
                else float("nan") for x, r in errs]
        if backend == "triton":
            tol_out, tol_grad = TOL[dtype]
            ok = rels[0] <= tol_out and all(e <= tol_grad for e in rels[1:])
        line.append(f"{backend} " + " ".join(f"{n} {e:.1e}" for n, e in zip(("out", "dq", "dk", "dv"), rels)))
    name = (f"B{b} T{t} H{h} D{d} W{window} look {lb}/{lf} causal={causal} {str(dtype)[6:]} mask={masked} "
            f"fused={fused}")
    return ok, f"{'ok  ' if ok else 'FAIL'} {name}: " + " | ".join(line)


def run_checks(device: torch.device) -> list[str]:
    failures = []
    for case in CHECKS:
        try:
            ok, text = check_one(*case, device=device)
        except Exception as err:  # a kernel that fails to compile is a failure, not the end
            ok, text = False, f"FAIL {case}: {type(err).__name__}: {err}"
        print(text, flush=True)
        if not ok:
            failures.append(str(case))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("checks:", "all passed" if not failures else f"{len(failures)} FAILED", flush=True)
    return failures


def fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def table(entries: list[dict]) -> str:
    ours = {(e["setup"], e["T"]): e for e in entries if e["variant"] == "ours"}
    lines = ["| setup | T | variant | fwd+bwd ms | x ours | fwd ms | x ours | peak MiB | kernels fwd+bwd (fwd) "
             "| max err out | max err grad |", "|" + "---|" * 11]
    for e in entries:
        base = ours.get((e["setup"], e["T"]), {})
        ratio = e.get("ms") / base["ms"] if e.get("ms") and base.get("ms") else None
        fwd_ratio = e.get("fwd_ms") / base["fwd_ms"] if e.get("fwd_ms") and base.get("fwd_ms") else None
        kernels = f"{e['kernels']} ({e['kernels_fwd']})" if e.get("kernels") is not None else "—"
        tail = e.get("error") or e.get("note") or ""
        lines.append(f"| {e['setup']} | {e['T']} | {e['variant']} | {fmt(e.get('ms'))} | {fmt(ratio)} | "
                     f"{fmt(e.get('fwd_ms'))} | {fmt(fwd_ratio)} | {fmt(e.get('peak_mib'), '.0f')} | {kernels} | "
                     f"{fmt(e.get('err_out'), '.1e')} | {fmt(e.get('err_grad'), '.1e')} |{tail and ' ' + tail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, kernel interpreted, fp32")
    p.add_argument("--t", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--check-t", type=int, default=8192, help="length at which errors are measured")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="write the entries as JSON")
    p.add_argument("--check", action="store_true", help="GPU: kernel vs the float64 reference at real sizes")
    args = p.parse_args(argv)
    if args.check:
        if not torch.cuda.is_available():
            print("--check needs a GPU", file=sys.stderr)
            return 2
        return 1 if run_checks(torch.device("cuda")) else 0
    if args.smoke:  # bf16 is wrong in the Triton interpreter
        args.t, args.check_t, args.heads, args.dim_head, args.window = [48, 80], 80, 2, 16, 16
        args.dtype, args.warmup, args.iters = "fp32", 0, 1
        device = torch.device("cpu")
        ok, text = check_one(2, 45, 2, 12, 8, 1, 1, False, torch.float32, True, True, device=device)
        print(text, flush=True)
        if not ok:
            return 1
    else:
        if not torch.cuda.is_available():
            print("no GPU: run with --smoke on the CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    flex, flex_note = make_flex(device, compiled=device.type == "cuda") if "flex" in args.variants else (None, "")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"flex: {flex_note}; B={args.batch} H={args.heads} D={args.dim_head} W={args.window} {args.dtype}",
          flush=True)
    timer = functools.partial(median_ms, warmup=args.warmup, iters=args.iters, device=device)
    entries = []
    for setup in args.setups:
        for t in args.t:
            for variant in args.variants:
                entry = run_one(variant, setup, t, args, device, timer, flex)
                print(json.dumps(entry), flush=True)
                entries.append(entry)
    print(table(entries))
    if args.out:
        meta = dict(device=str(device), torch=torch.__version__, flex=flex_note, **{
            k: v for k, v in vars(args).items() if k != "out"})
        args.out.write_text(json.dumps({"meta": meta, "entries": entries}, indent=1, default=str))
    failed = [e for e in entries if e["variant"] in ("ours", "torch") and "error" in e]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
