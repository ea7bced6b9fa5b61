"""Linear attention and HoMM: our Triton kernels against flash-linear-attention (fla), SDPA flash and our
PyTorch path in one run, and a 2-layer causal block's tokens/s against softmax.

    PYTHONPATH=. python benchmarks/bench_linear.py --out linear.json          # op table (issue 19's shapes)
    PYTHONPATH=. python benchmarks/bench_linear.py --homm --block             # + HoMM op, 2-layer blocks
    PYTHONPATH=. python benchmarks/bench_linear.py --check                    # GPU: kernels vs float64
    PYTHONPATH=. python benchmarks/bench_linear.py --tune                     # segments / tiles sweep
    PYTHONPATH=. python benchmarks/bench_linear.py --smoke                    # CPU, kernels interpreted

Op table: causal elu + 1 linear attention, bf16, forward + backward, median of CUDA-event timings (L2
flushed before each), q, k, v separate (B, T, H, D) tensors. Variants:
  attnlab  linear_attention(backend="triton"): attention/linear/kernel.py (feature map fused)
  fla      elu(x) + 1 in PyTorch, then fla.ops.linear_attn.chunk_linear_attn(normalize=True) (fla-core)
  sdpa     F.scaled_dot_product_attention(is_causal=True): softmax attention, flash on the GPU
  torch    linear_attention(backend="reference"): our chunked PyTorch path (float32 inside)
Peak MiB: the allocator's high-water mark of one forward + backward above what was allocated before.
err: relative L2 error of the output and the gradients against our PyTorch path in float32 on the same
inputs (at the first shape). HoMM op: homm_mix (GELU, moments, running mean, gates) on (B, T, F).
Block: attention.models.Transformer(depth 2, dim 512, 8 heads of 64, causal), bf16 weights and inputs,
batch 1, forward + backward of mean(out^2); tokens/s = T / time. Never gates CI.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before triton is imported: the kernels run in the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attention  # noqa: E402
from attention.homm import homm_mix  # noqa: E402
from attention.linear import linear_attention  # noqa: E402
from attention.linear.chunked import linear_attention as linear_attention_torch  # noqa: E402
from attention.models import Transformer  # noqa: E402
from benchmarks.timing import count_kernels, median_ms, peak_mib  # noqa: E402

# (B, H, D, T): issue 19's table
SHAPES = [(8, 16, 64, 1024), (8, 16, 64, 2048), (8, 16, 64, 4096), (4, 16, 64, 8192), (2, 16, 64, 16384),
          (1, 8, 64, 32768), (1, 8, 64, 131072)]
VARIANTS = ("attnlab", "fla", "sdpa", "torch")
# (B, T, F, order): HoMM at dim 512 (F = order 2 x expand 2 x 512) and a wider batch
HOMM_SHAPES = [(8, 4096, 1024, 2), (1, 16384, 2048, 2), (1, 65536, 2048, 2)]
BLOCK_METHODS = [("softmax", "sdpa", {}), ("linear", "triton", {"feature_map": "elu"}),
                 ("linear", "reference", {"feature_map": "elu"}), ("homm", "triton", {}), ("homm", "reference", {})]


def make_fla():
    """(attend(q, k, v) on (B, T, H, D) -> out, note); attend is None when fla does not import."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as err:
        return None, f"fla not importable: {type(err).__name__}: {str(err)[:120]}"

    def attend(q, k, v):
        out, _ = chunk_linear_attn(F.elu(q) + 1, F.elu(k) + 1, v, normalize=True)
        return out

    import fla
    return attend, f"fla-core {getattr(fla, '__version__', '?')}"


def make_op(variant: str, fla):
    if variant == "attnlab":
        return lambda q, k, v: linear_attention(q, k, v, causal=True, feature_map="elu", backend="triton")
    if variant == "torch":
        return lambda q, k, v: linear_attention(q, k, v, causal=True, feature_map="elu", backend="reference")
    if variant == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    return fla


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def op_errors(op, ins, grad) -> dict:
    """Relative L2 errors of op's output and gradients against our PyTorch path in float32."""
    ref_in = [x.detach().float().requires_grad_() for x in ins]
    ref = linear_attention_torch(*ref_in, causal=True, feature_map="elu")
    ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
    got_in = [x.detach().clone().requires_grad_() for x in ins]
    out = op(*got_in)
    grads = torch.autograd.grad(out, got_in, grad)
    return {"err_out": rel(out, ref), "err_grad": max(rel(g, r) for g, r in zip(grads, ref_grads))}


def guarded(entry: dict, fn) -> dict:
    try:
        fn(entry)
    except Exception as err:  # a row that fails (out of memory, a compile error) is reported, not fatal
        entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entry


def run_op(variant, shape, args, device, timer, fla, with_errors: bool) -> dict:
    b, h, d, t = shape
    entry = {"B": b, "H": h, "D": d, "T": t, "variant": variant}
    op = make_op(variant, fla)
    if op is None:
        entry["error"] = "skipped: fla unavailable"
        return entry

    def measure(e):
        gen = torch.Generator(device=device).manual_seed(t)
        ins = [(torch.randn(b, t, h, d, device=device, generator=gen) * 0.5).to(args.dtype).requires_grad_()
               for _ in range(3)]
        grad = torch.randn(b, t, h, d, device=device, generator=gen).to(args.dtype)

        def fwd_bwd():
            for x in ins:
                x.grad = None
            op(*ins).backward(grad)

        def forward():
            with torch.no_grad():
                op(*ins)

        e["ms"] = timer(fwd_bwd)
        e["fwd_ms"] = timer(forward)
        e["peak_mib"] = peak_mib(fwd_bwd, device)
        e["kernels"] = count_kernels(fwd_bwd, device)
        if with_errors and variant != "sdpa":
            e.update(op_errors(op, ins, grad))

    return guarded(entry, measure)


def op_table(entries: list[dict]) -> str:
    rows = {}
    for e in entries:
        rows.setdefault((e["B"], e["H"], e["D"], e["T"]), {})[e["variant"]] = e
    lines = ["| shape | attnlab ms | fla ms | sdpa ms | torch ms | x fla | x sdpa | attnlab MiB | fla MiB | torch MiB "
             "| kernels attnlab / fla | attnlab fwd ms |", "|" + "---|" * 12]
    for (b, h, d, t), row in rows.items():
        ms = {v: row.get(v, {}).get("ms") for v in VARIANTS}
        ratio = {v: ms[v] / ms["attnlab"] if ms[v] and ms["attnlab"] else None for v in ("fla", "sdpa")}
        mib = {v: row.get(v, {}).get("peak_mib") for v in ("attnlab", "fla", "torch")}
        kern = " / ".join(str(row.get(v, {}).get("kernels") or "—") for v in ("attnlab", "fla"))
        notes = "; ".join(f"{v}: {e['error']}" for v, e in row.items() if "error" in e)
        lines.append(f"| B{b} H{h} D{d} T{t} | {fmt(ms['attnlab'])} | {fmt(ms['fla'])} | {fmt(ms['sdpa'])} | "
                     f"{fmt(ms['torch'])} | {fmt(ratio['fla'])} | {fmt(ratio['sdpa'])} | "
                     f"{fmt(mib['attnlab'], '.0f')} | {fmt(mib['fla'], '.0f')} | {fmt(mib['torch'], '.0f')} | {kern} | "
                     f"{fmt(row.get('attnlab', {}).get('fwd_ms'))} |{notes and ' ' + notes}")
    return "\n".join(lines)


def fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------- HoMM


def run_homm(backend, shape, args, device, timer) -> dict:
    b, t, f, order = shape
    entry = {"B": b, "T": t, "F": f, "order": order, "backend": backend}

    def measure(e):
        gen = torch.Generator(device=device).manual_seed(t)
        hidden, select = (torch.randn(b, t, f, device=device, generator=gen).to(args.dtype).requires_grad_()
                          for _ in range(2))
        grad = torch.randn(b, t, f, device=device, generator=gen).to(args.dtype)

        def fwd_bwd():
            hidden.grad = select.grad = None
            homm_mix(hidden, select, order, causal=True, backend=backend).backward(grad)

        e["ms"] = timer(fwd_bwd)
        e["peak_mib"] = peak_mib(fwd_bwd, device)
        e["kernels"] = count_kernels(fwd_bwd, device)

    return guarded(entry, measure)


def homm_table(entries: list[dict]) -> str:
    lines = ["| B T F order | backend | fwd+bwd ms | peak MiB | kernels |", "|" + "---|" * 5]
    for e in entries:
        note = " " + e["error"] if "error" in e else ""
        lines.append(f"| B{e['B']} T{e['T']} F{e['F']} O{e['order']} | {e['backend']} | {fmt(e.get('ms'))} | "
                     f"{fmt(e.get('peak_mib'), '.0f')} | {e.get('kernels') or '—'} |{note}")
    return "\n".join(lines)


def run_block(method, backend, extra, t, args, device, timer) -> dict:
    entry = {"T": t, "method": method, "backend": backend}

    def measure(e):
        knobs = {"backend": backend} if method != "softmax" else {}
        if method != "homm":
            knobs.update(heads=args.block_heads)
        cfg = attention.make_config(method, causal=True, **knobs, **extra)
        torch.manual_seed(0)
        model = Transformer(cfg, args.block_dim, 2).to(device=device, dtype=args.dtype)
        x = torch.randn(args.block_batch, t, args.block_dim, device=device, dtype=args.dtype, requires_grad=True)

        def fwd_bwd():
            x.grad = None
            model.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()

        e["ms"] = timer(fwd_bwd)
        e["tokens_per_s"] = args.block_batch * t / (e["ms"] / 1e3)
        e["peak_mib"] = peak_mib(fwd_bwd, device)

    return guarded(entry, measure)


def block_table(entries: list[dict]) -> str:
    soft = {e["T"]: e.get("tokens_per_s") for e in entries if e["method"] == "softmax"}
    lines = ["| T | method | backend | fwd+bwd ms | tokens/s | x softmax | peak MiB |", "|" + "---|" * 7]
    for e in entries:
        tps, base = e.get("tokens_per_s"), soft.get(e["T"])
        lines.append(f"| {e['T']} | {e['method']} | {e['backend']} | {fmt(e.get('ms'))} | {fmt(tps, '.3g')} | "
                     f"{fmt(tps / base if tps and base else None)} | {fmt(e.get('peak_mib'), '.0f')} |"
                     f"{' ' + e['error'] if 'error' in e else ''}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- correctness

# (B, T, S, H, D, Dv, causal, feature map, dtype, key mask)
LINEAR_CHECKS = [
    (2, 4097, 4097, 4, 64, 64, True, "elu", torch.bfloat16, True),
    (1, 16384, 16384, 8, 64, 64, True, "elu", torch.bfloat16, False),
    (2, 1000, 1000, 3, 60, 44, True, "relu", torch.float16, True),
    (2, 1025, 777, 2, 64, 64, False, "elu", torch.bfloat16, True),
    (1, 2048, 2048, 2, 128, 128, True, "identity", torch.bfloat16, False),
    (1, 1025, 1025, 2, 128, 128, True, "elu", torch.float32, True),
    (2, 3000, 3000, 4, 32, 64, False, "relu", torch.float32, False),
]
# (B, T, S, F, order, causal, dtype, key mask)
HOMM_CHECKS = [
    (1, 16384, 16384, 2048, 2, True, torch.bfloat16, False),
    (2, 1000, 1000, 300, 3, True, torch.float16, True),
    (2, 1025, 777, 256, 2, False, torch.bfloat16, True),
    (1, 4097, 4097, 512, 4, True, torch.float32, True),
]
FP32_FLOOR = 1e-5  # float32 cases: both paths sit at rounding level; pass below this relative error


def compare(run, ins, truth_grads, truth, grad, dtype) -> list[float]:
    """[out, grads...] relative L2 errors of run(*ins) against the float64 truth."""
    out = run(*ins)
    grads = torch.autograd.grad(out, [x for x in ins if x.requires_grad], grad.to(dtype))
    return [rel(out, truth)] + [rel(g, r) for g, r in zip(grads, truth_grads)]


def check_case(kind, case, device) -> tuple[bool, str]:
    gen = torch.Generator(device=device).manual_seed(sum(case[:4]))
    if kind == "linear":
        b, t, s, h, d, dv, causal, fmap, dtype, masked = case
        shapes = [(b, t, h, d), (b, s, h, d), (b, s, h, dv)]
        raw = [torch.randn(sh, device=device, generator=gen) * 0.5 for sh in shapes]
        if fmap == "identity":  # already non-negative features
            raw[0], raw[1] = raw[0].abs(), raw[1].abs()
        key_mask = (torch.rand(b, s, device=device, generator=gen) > 0.2) if masked else None
        kw = dict(causal=causal, feature_map=fmap, key_mask=key_mask)

        def run(backend):
            return lambda *x: linear_attention(*x, backend=backend, **kw)
        truth_fn = functools.partial(linear_attention_torch, **kw)
        name = f"linear B{b} T{t} S{s} H{h} D{d} Dv{dv} causal={causal} {fmap} {str(dtype)[6:]} mask={masked}"
        labels = ("out", "dq", "dk", "dv")
    else:
        b, t, s, f, order, causal, dtype, masked = case
        raw = [torch.randn(b, s, f, device=device, generator=gen), torch.randn(b, t, f, device=device, generator=gen)]
        key_mask = (torch.rand(b, s, device=device, generator=gen) > 0.2) if masked else None
        kw = dict(causal=causal, key_mask=key_mask)

        def run(backend):
            return lambda *x: homm_mix(*x, order, backend=backend, **kw)
        truth_fn = functools.partial(homm_mix, order=order, backend="reference", **kw)
        name = f"homm B{b} T{t} S{s} F{f} order {order} causal={causal} {str(dtype)[6:]} mask={masked}"
        labels = ("out", "dhidden", "dselect")
    ins = [x.to(dtype).requires_grad_() for x in raw]
    truth_in = [x.detach().double().requires_grad_() for x in ins]
    truth = truth_fn(*truth_in)
    grad = torch.randn(truth.shape, device=device, dtype=torch.float64, generator=gen)
    truth_grads = torch.autograd.grad(truth, truth_in, grad)
    ours = compare(run("triton"), ins, truth_grads, truth, grad, dtype)
    theirs = compare(run("reference"), ins, truth_grads, truth, grad, dtype)
    floor = FP32_FLOOR if dtype == torch.float32 else 0.0
    ok = all(o <= max(2 * p, floor) for o, p in zip(ours, theirs))
    errs = " ".join(f"{n} {o:.1e}/{p:.1e}" for n, o, p in zip(labels, ours, theirs))
    return ok, f"{'ok  ' if ok else 'FAIL'} {name}: kernel/PyTorch-path error vs float64: {errs}"


def run_checks(device, which: list[int] | None = None) -> list[str]:
    """The cases of LINEAR_CHECKS + HOMM_CHECKS numbered `which` (all by default)."""
    failures = []
    numbered = [("linear", c) for c in LINEAR_CHECKS] + [("homm", c) for c in HOMM_CHECKS]
    for i, (kind, case) in enumerate(numbered):
        if which is not None and i not in which:
            continue
        try:
            ok, text = check_case(kind, case, device)
        except Exception as err:  # a kernel that fails to compile is a failure, not the end
            ok, text = False, f"FAIL {kind} {case}: {type(err).__name__}: {str(err)[:300]}"
        print(text, flush=True)
        if not ok:
            failures.append(text)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("checks:", "all passed" if not failures else f"{len(failures)} FAILED", flush=True)
    return failures


# ---------------------------------------------------------------------------------------------- tuning


def run_tune(args, device, timer) -> list[dict]:
    """fwd+bwd ms of our kernel per segment count and tile choice at a few shapes (bf16, causal elu)."""
    from attention.linear.kernel import LinearTiles, Tile, default_tiles, linear_attention_triton

    tile_sets = {"default": None,
                 "fwd w8": LinearTiles(Tile(64, 8), Tile(64, 4), Tile(64, 8)),
                 "bwd w4": LinearTiles(Tile(64, 4), Tile(64, 4), Tile(64, 4)),
                 "chunk 32": LinearTiles(Tile(32, 4), Tile(32, 4), Tile(32, 4))}
    results = []
    for b, h, d, t in [(8, 16, 64, 1024), (8, 16, 64, 4096), (2, 16, 64, 16384), (1, 8, 64, 131072)]:
        gen = torch.Generator(device=device).manual_seed(0)
        ins = [torch.randn(b, t, h, d, device=device, generator=gen).to(args.dtype).requires_grad_() for _ in range(3)]
        grad = torch.randn(b, t, h, d, device=device, generator=gen).to(args.dtype)
        for name, tiles in tile_sets.items():
            for segments in (None, 1, 2, 4, 8, 16, 32, 64):
                if segments is not None and (segments > t // 256 or (name != "default" and segments != 8)):
                    continue
                use = dataclasses.replace(tiles or default_tiles(args.dtype, d, False), segments=segments)

                def fwd_bwd(ins=ins, grad=grad, use=use):
                    for x in ins:
                        x.grad = None
                    linear_attention_triton(*ins, causal=True, tiles=use).backward(grad)

                entry = {"B": b, "H": h, "T": t, "tiles": name, "segments": segments or "auto"}
                results.append(guarded(entry, lambda e, fn=fwd_bwd: e.update(ms=timer(fn))))
                print(json.dumps(results[-1]), flush=True)
    return results


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, kernels interpreted, fp32")
    p.add_argument("--check", action="store_true", help="GPU: kernels vs float64 at real sizes (after the tables)")
    p.add_argument("--checks", type=int, nargs="+", default=None,
                   help="with --check: only these cases (numbers into LINEAR_CHECKS + HOMM_CHECKS)")
    p.add_argument("--homm", action="store_true", help="also the HoMM op table")
    p.add_argument("--block", action="store_true", help="also the 2-layer block tokens/s table")
    p.add_argument("--tune", action="store_true", help="also the segments / tiles sweep")
    p.add_argument("--no-ops", action="store_true", help="skip the linear op table")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--block-t", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--block-dim", type=int, default=512)
    p.add_argument("--block-heads", type=int, default=8)
    p.add_argument("--block-batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="write the entries as JSON")
    args = p.parse_args(argv)
    args.dtype = torch.bfloat16
    shapes, homm_shapes = SHAPES, HOMM_SHAPES
    if args.smoke:  # bf16 is wrong in the Triton interpreter
        device = torch.device("cpu")
        args.dtype, args.warmup, args.iters = torch.float32, 0, 1
        args.variants = [v for v in args.variants if v != "fla"]
        shapes, homm_shapes, args.block_t, args.block_dim = [(1, 2, 16, 40)], [(1, 40, 32, 2)], [24], 32
        ok, text = check_case("linear", (2, 37, 37, 2, 12, 20, True, "elu", torch.float32, True), device)
        print(text, flush=True)
        if not ok:
            return 1
    elif not torch.cuda.is_available():
        print("no GPU: run with --smoke on the CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    fla, fla_note = make_fla() if "fla" in args.variants else (None, "not asked for")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"fla: {fla_note}", flush=True)
    timer = functools.partial(median_ms, warmup=args.warmup, iters=args.iters, device=device)
    results: dict = {"meta": dict(device=str(device), torch=torch.__version__, fla=fla_note,
                                  **{k: str(v) for k, v in vars(args).items() if k != "out"})}

    def save():
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))

    started = time.perf_counter()
    if not args.no_ops:
        results["ops"] = []
        for i, shape in enumerate(shapes):
            for variant in args.variants:
                entry = run_op(variant, shape, args, device, timer, fla, with_errors=i == 0)
                print(json.dumps(entry), flush=True)
                results["ops"].append(entry)
            save()
        print(op_table(results["ops"]), flush=True)
    if args.block or args.smoke:
        results["block"] = []
        for t in args.block_t:
            for method, backend, extra in BLOCK_METHODS:
                entry = run_block(method, backend, extra, t, args, device, timer)
                print(json.dumps(entry), flush=True)
                results["block"].append(entry)
            save()
        print(block_table(results["block"]), flush=True)
    if args.homm or args.smoke:
        results["homm"] = [run_homm(backend, shape, args, device, timer)
                           for shape in homm_shapes for backend in ("triton", "reference")]
        save()
        print(homm_table(results["homm"]), flush=True)
    failures = run_checks(device, args.checks) if args.check else []
    if args.tune and not args.smoke:
        results["tune"] = run_tune(args, device, timer)
        save()
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    failed = [e for e in results.get("ops", []) if e["variant"] in ("attnlab", "torch") and "error" in e]
    return 1 if failed or failures else 0


if __name__ == "__main__":
    sys.exit(main())
