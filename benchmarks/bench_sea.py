"""SEA against dense SDPA (flash) on a GPU, T = 8k .. 128k, causal, bf16.

    PYTHONPATH=. python benchmarks/bench_sea.py --check      # Triton kernel vs the PyTorch path, on the GPU
    PYTHONPATH=. python benchmarks/bench_sea.py              # the table
    PYTHONPATH=. python benchmarks/bench_sea.py --smoke      # tiny, on the CPU: the script itself runs

Rows, each batch 1, 8 heads of 64 (dim 512), causal, bf16 autocast, CUDA-event medians:
  mixer   the whole token mixer (q/k/v/out projections included): SoftmaxAttention (SDPA) vs
          SeaAttention (Performer estimate + predictor + top-k + sparse kernel; the training step also
          computes the estimation loss on loss_rows sampled rows);
  op      the attention op alone: SDPA vs the sparse kernel over a given mask of the same k;
  stages  SEA forward split into estimate (Performer cell mass + predictor), select (top-k + CSR) and sparse.
Peak = torch.cuda.max_memory_allocated() above what was allocated before the run. Never gates CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import attention
from attention.sea import SeaAttention, key_geometry, performer_bin_mass, select_cells, sparse_attention
from attention.sea.estimator import empty_cells
from attention.softmax import SoftmaxAttention
from benchmarks.timing import median_ms, peak_mib

DIM, HEADS = 512, 8
SEA = {"k": 256, "predictor_length": 256, "nb_features": 16, "loss_rows": 64}


def timed(fn, reps: int, warmup: int = 1, device: str = "cuda") -> tuple[float, float]:
    """(median ms, peak extra MiB of one run: NaN on the CPU)."""
    ms = median_ms(fn, warmup=warmup, iters=reps, device=device, flush_l2=False)
    peak = peak_mib(fn, device)
    return ms, float("nan") if peak is None else peak


def guarded(name, fn, *args):
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        print(f"{name}: out of memory", flush=True)
        torch.cuda.empty_cache()
        return ("OOM", float("nan"))
    except Exception as e:  # a failing row is reported, the table goes on
        traceback.print_exc()
        return (f"error: {type(e).__name__}", float("nan"))


def mixers(device, causal=True, sea=None):
    torch.manual_seed(0)
    soft = SoftmaxAttention(attention.make_config("softmax", heads=HEADS, causal=causal), DIM).to(device)
    cfg = attention.make_config("sea", heads=HEADS, causal=causal, **(sea or SEA))
    return soft, SeaAttention(cfg, DIM).to(device)


def bench_length(t: int, device: str, reps: int) -> dict:
    row: dict = {"T": t}
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    soft, sea = mixers(device)
    x = torch.randn(1, t, DIM, device=device)

    def infer(mixer):
        def run():
            with torch.no_grad(), amp:
                mixer.eval()(x)
        return run

    def train(mixer):
        def run():
            mixer.train()
            for p in mixer.parameters():
                p.grad = None
            with amp:
                y = mixer(x)
            y.float().square().mean().backward()
        return run

    for name, mixer in (("sdpa", soft), ("sea", sea)):
        row[f"mixer_fwd_{name}"] = guarded(f"{name} fwd T={t}", timed, infer(mixer), reps, 1, device)
        row[f"mixer_train_{name}"] = guarded(f"{name} train T={t}", timed, train(mixer), reps, 1, device)
        print(t, name, row[f"mixer_fwd_{name}"], row[f"mixer_train_{name}"], flush=True)
    row["density"] = float(sea.aux.get("mask_density", float("nan")))

    # The ops alone, bf16 q, k, v (B, T, H, D)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(1, t, HEADS, DIM // HEADS, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    geo = key_geometry(1, t, t, True, None, SEA["predictor_length"], torch.device(device))
    est = torch.rand(1, t, HEADS, SEA["predictor_length"], device=device)
    mask = select_cells(est, geo, SEA["k"], "head")

    def op_sdpa(backward):
        def run():
            out = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)), is_causal=True)
            if backward:
                out.float().sum().backward()
        return run

    def op_sparse(backward):
        def run():
            out = sparse_attention(q, k, v, mask, geo)
            if backward:
                out.float().sum().backward()
        return run

    for backward in (False, True):
        tag = "fwdbwd" if backward else "fwd"
        row[f"op_{tag}_sdpa"] = guarded("sdpa op", timed, op_sdpa(backward), reps, 1, device)
        row[f"op_{tag}_sparse"] = guarded("sparse op", timed, op_sparse(backward), reps, 1, device)
    print(t, "ops", {k: v for k, v in row.items() if k.startswith("op_")}, flush=True)

    # SEA forward stages
    with torch.no_grad(), amp:
        qq, kk, vv = sea.qkv(x)
        stages = {
            "estimate": lambda: sea.predictor(performer_bin_mass(qq, kk, geo, sea.projection), qq, empty_cells(geo)),
            "select": lambda: select_cells(est, geo, SEA["k"], "head"),
            "sparse": lambda: sparse_attention(qq, kk, vv, mask, geo),
        }
        for name, fn in stages.items():
            row[f"stage_{name}"] = guarded(name, timed, fn, reps, 1, device)
    print(t, "stages", {k: v for k, v in row.items() if k.startswith("stage_")}, flush=True)
    return row  # the tensors go with this frame; main() empties the CUDA cache between lengths


def check(device: str) -> list[str]:
    """The Triton kernel against the PyTorch path (float64) at real sizes, and the mixer at k = T
    against SDPA."""
    from attention.sea.sparse import sparse_attention_torch

    failures = []
    torch.manual_seed(0)
    for t, bins, k, masked, dtype, tol in ((2048, 64, 128, False, torch.bfloat16, 2e-2),
                                          (1500, 100, 64, True, torch.float16, 4e-3),
                                          (1031, 31, 48, True, torch.float32, 1e-4)):
        b, h, d = 2, 4, 64
        km = (torch.rand(b, t, device=device) > 0.2) if masked else None
        geo = key_geometry(b, t, t, True, km, bins, torch.device(device))
        mask = select_cells(torch.rand(b, t, h, bins, device=device), geo, k, "query")
        q, kk, v = (torch.randn(b, t, h, d, device=device).to(dtype) for _ in range(3))
        leaves = [z.clone().requires_grad_() for z in (q, kk, v)]
        out = sparse_attention(*leaves, mask, geo, backend="triton")
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        ref_leaves = [z.double().requires_grad_() for z in (q, kk, v)]
        want, _ = sparse_attention_torch(*ref_leaves, mask, geo)
        wants = torch.autograd.grad(want, ref_leaves, grad.double())
        errs = {"out": ((out.double() - want).norm() / want.norm()).item()}
        errs.update({f"d{n}": ((g.double() - w).norm() / w.norm()).item() for n, g, w in zip("qkv", got, wants)})
        ok = all(e <= tol for e in errs.values())
        print(f"{'ok  ' if ok else 'FAIL'} kernel T={t} P={bins} k={k} masked={masked} {dtype}: "
              + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
        if not ok:
            failures.append(f"kernel T={t} {dtype}")
    soft, sea = mixers(device, sea={"k": 1024, "predictor_length": 32})
    sea.load_state_dict(soft.state_dict(), strict=False)
    x = torch.randn(2, 1024, DIM, device=device)
    with torch.no_grad():
        diff = (sea.eval()(x) - soft.eval()(x)).abs().max().item()
    print(f"{'ok  ' if diff < 1e-4 else 'FAIL'} SEA mixer at k = T vs SDPA, float32: max diff {diff:.1e}", flush=True)
    if diff >= 1e-4:
        failures.append("mixer k=T")
    return failures


def markdown(rows: list[dict]) -> str:
    def cell(v):
        ms, mib = v
        return ms if isinstance(ms, str) else f"{ms:.1f} ms, {mib:.0f} MiB"

    lines = ["| T | SDPA mixer fwd | SEA mixer fwd | SDPA mixer train step | SEA mixer train step "
             "| SEA keys / visible |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {cell(r['mixer_fwd_sdpa'])} | {cell(r['mixer_fwd_sea'])} | "
                     f"{cell(r['mixer_train_sdpa'])} | {cell(r['mixer_train_sea'])} | {r['density']:.4f} |")
    lines += ["", "| T | SDPA op fwd | sparse kernel fwd | SDPA op fwd+bwd | sparse kernel fwd+bwd |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {cell(r['op_fwd_sdpa'])} | {cell(r['op_fwd_sparse'])} | "
                     f"{cell(r['op_fwdbwd_sdpa'])} | {cell(r['op_fwdbwd_sparse'])} |")
    lines += ["", "| T | estimate (Performer + predictor) | select (top-k, CSR) | sparse kernel |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {cell(r['stage_estimate'])} | {cell(r['stage_select'])} | "
                     f"{cell(r['stage_sparse'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, T = 512 and 1024, the PyTorch path")
    parser.add_argument("--lengths", type=int, nargs="*", default=None,
                        help="sequence lengths (default 8192 .. 131072; --smoke: 512 1024)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for bench_sea.json / .md")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        SEA.update(k=32, predictor_length=32)
        args.lengths, args.reps = args.lengths or [512, 1024], 1
    elif not torch.cuda.is_available():
        print("no GPU: use --smoke on the CPU")
        return 2
    else:
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if args.check:
        return 1 if check(device) else 0
    args.lengths = args.lengths or [8192, 16384, 32768, 65536, 131072]
    rows = []
    for t in args.lengths:
        rows.append(bench_length(t, device, args.reps))
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.out:  # after every length: a run cut short still leaves its rows
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench_sea.json").write_text(json.dumps(rows, indent=1))
            (Path(args.out) / "bench_sea.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
