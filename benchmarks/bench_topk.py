"""Top-k attention op on a GPU: the flex_attention path (per-row thresholds + fused kernels) against the
chunked PyTorch op and dense SDPA (flash), forward + backward.

    PYTHONPATH=. python benchmarks/bench_topk.py --check      # flex vs chunked op at real sizes, then the table
    PYTHONPATH=. python benchmarks/bench_topk.py --smoke      # CPU, tiny sizes (the chunked op only)

Inputs (B, T, H, D) causal, k keys per query. Times: CUDA-event medians (benchmarks/timing.py), peak =
extra allocator memory of one forward + backward. --check: relative L2 error of the flex path's output
and gradients against the chunked op, and the fraction of rows whose kept-key count differs from k.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention.topk import topk_attention  # noqa: E402
from benchmarks.timing import median_ms, peak_mib  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inputs(b, t, h, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, t, h, d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def run(kind: str, q, k, v, topk: int, causal: bool):
    if kind == "sdpa":
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal)
        return out.transpose(1, 2)
    return topk_attention(q, k, v, topk=topk, causal=causal, backend="triton" if kind == "flex" else "reference")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def check(args, device) -> list[dict]:
    rows = []
    for name in sorted(set(args.dtypes) | {"fp32"}):
        q, k, v = inputs(args.batch, args.check_t, args.heads, args.dim, DTYPES[name], device)
        grad = torch.randn_like(q)
        out = run("flex", q, k, v, args.k, True)
        got = (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))
        # the chunked op on float32 copies: it selects on float32 scores, as the flex path does (in bf16
        # the chunked op selects on bf16-rounded scores, whose many ties it breaks arbitrarily)
        wide = [x.detach().float().requires_grad_() for x in (q, k, v)]
        out = run("chunked", *wide, args.k, True)
        want = (out.detach(), *torch.autograd.grad(out, wide, grad.float()))
        entry = {"check": f"flex {name} vs chunked fp32", "T": args.check_t,
                 **{f"{n}_rel": rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}}
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="head dim")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seq-lens", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--kinds", nargs="*", default=["sdpa", "flex", "chunked"])
    p.add_argument("--dtypes", nargs="*", default=["bf16"])
    p.add_argument("--check", action="store_true")
    p.add_argument("--check-t", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.heads, args.dim, args.k, args.seq_lens = 1, 2, 16, 4, [64]
        args.kinds, args.dtypes, args.warmup, args.iters, args.check = ["chunked"], ["fp32"], 1, 2, False
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    checks = check(args, device) if args.check else []
    results = []
    for name in args.dtypes:
        for t in args.seq_lens:
            for kind in args.kinds:
                entry = {"kind": kind, "dtype": name, "T": t}
                try:
                    q, k, v = inputs(args.batch, t, args.heads, args.dim, DTYPES[name], device)

                    def step(kind=kind, q=q, k=k, v=v):
                        run(kind, q, k, v, args.k, True).sum().backward()

                    for _ in range(args.warmup):
                        step()
                    entry["ms"] = median_ms(step, warmup=0, iters=args.iters, device=device)
                    entry["peak_mib"] = peak_mib(step, device)
                except Exception as err:  # a failing row is reported, not fatal
                    entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                results.append(entry)
                print(json.dumps(entry), flush=True)
    print("\n| kind | dtype | T | fwd+bwd ms | peak MiB |\n|---|---|---|---|---|")
    for r in results:
        cells = f"{r['ms']:.2f} | {r['peak_mib'] or float('nan'):.0f}" if "ms" in r else f"{r['error']} |"
        print(f"| {r['kind']} | {r['dtype']} | {r['T']} | {cells} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                                        "checks": checks, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
