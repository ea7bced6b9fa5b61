"""CoLT5 routed attention against a dense SDPA block, and routed autoregressive peak memory.

    python benchmarks/bench_colt5.py                 # GPU: the issue's sizes (dim 512, 8 + 8 heads, 1024 routed)
    python benchmarks/bench_colt5.py --smoke         # CPU, tiny sizes, seconds
    python benchmarks/bench_colt5.py --check --rows routed_ar:bf16 routed_ar:fp32 peer_ar:fp32   # vs the peer

Rows: dense (SDPA), routed (bidirectional), routed_ar (ours, causal), peer_ar (colt5-attention's
ConditionalRoutedAutoregressiveAttention at the same sizes, when importable), each as kind:dtype.
--check first compares the causal modules on the Triton routers with the PyTorch ones at real sizes.

Each row is a pre-norm attention block x + mixer(norm(x)) at batch 1, forward + backward, timed with
CUDA events (median of --iters after --warmup) and its peak memory above the inputs and weights
(torch.cuda.max_memory_allocated). Writes a markdown table to stdout and JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attention  # noqa: E402
from benchmarks.timing import median_ms, peak_mib  # noqa: E402


class PreNormBlock(nn.Module):
    def __init__(self, mixer: nn.Module, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


def build_peer(dim: int, args) -> nn.Module:
    """colt5-attention's ConditionalRoutedAutoregressiveAttention at our autoregressive row's sizes (its
    router on its own Triton coordinate descent, the same iterations; it fails under bf16 autocast)."""
    from colt5_attention import ConditionalRoutedAutoregressiveAttention

    head = dim // args.heads
    return ConditionalRoutedAutoregressiveAttention(
        dim, num_heavy_tokens_q=args.ar_q_per_window, num_heavy_tokens_kv=args.routed_kv,
        light_window_size=args.light_window, heavy_window_size=args.ar_window, light_heads=args.heads,
        heavy_heads=args.heads, light_dim_head=head, heavy_dim_head=head, use_triton=True,
        router_kwargs={"n_iters": args.router_iters})


def build(kind: str, dim: int, args) -> nn.Module:
    common = {"heads": args.heads, "dim_head": dim // args.heads}
    if kind == "peer_ar":
        return PreNormBlock(build_peer(dim, args), dim)
    if kind == "dense":
        cfg = attention.make_config("softmax", **common)
    else:
        cfg = attention.make_config(
            "colt5", **common, causal=kind == "routed_ar", num_routed_q=args.routed_q,
            window_routed_q=args.ar_q_per_window, num_routed_kv=args.routed_kv, light_window=args.light_window,
            heavy_window=args.ar_window, backend=args.backend, router_iters=args.router_iters,
            cuda_graphs=False)  # eager rows stay eager; "CUDA graph" = the whole block captured (--graph)
    return PreNormBlock(attention.build(cfg, dim), dim)


class Autocast(nn.Module):
    """The block under bf16 autocast (cache off, as CUDA graph capture requires)."""

    def __init__(self, block: nn.Module, enabled: bool):
        super().__init__()
        self.block, self.enabled = block, enabled

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.enabled, cache_enabled=False):
            return self.block(x).float()


def measure(block: nn.Module, t: int, dim: int, dtype: str, device: torch.device, warmup: int, iters: int,
            graph: bool = False):
    """graph: capture forward + backward once as CUDA graphs (torch.cuda.make_graphed_callables) and
    replay them, which removes the per-kernel launch cost of the Python side."""
    x = torch.randn(1, t, dim, device=device, requires_grad=True)
    fn = Autocast(block, dtype == "bf16")
    if graph:
        fn = torch.cuda.make_graphed_callables(fn, (x,), num_warmup_iters=warmup)

    def step():
        fn(x).sum().backward()
        block.zero_grad(set_to_none=not graph)  # graphs keep their gradient buffers
        x.grad = None

    for _ in range(warmup):
        step()
    peak = peak_mib(step, device)
    ms = median_ms(step, warmup=0, iters=iters, device=device, flush_l2=False)
    return ms, float("nan") if peak is None else peak


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))


def check(args, device: torch.device) -> list[dict]:
    """The causal modules with the Triton routers (backend 'auto', on CUDA) against the same weights on the
    PyTorch routers (backend 'reference'), float32 at real sizes: output and every gradient, relative L2."""
    from attention.colt5 import CausalRoutedFeedForward, RoutedAutoregressiveAttention

    rows = []
    for name, cls in (("autoregressive", RoutedAutoregressiveAttention), ("feedforward", CausalRoutedFeedForward)):
        for t in args.check_seq_lens:
            cfgs = [attention.make_config(
                "colt5", heads=args.heads, dim_head=args.dim // args.heads, causal=True,
                window_routed_q=args.ar_q_per_window, window_routed_ff=args.ar_q_per_window,
                num_routed_kv=args.routed_kv, light_window=args.light_window, heavy_window=args.ar_window,
                router_iters=args.router_iters, backend=backend) for backend in ("auto", "reference")]
            torch.manual_seed(0)
            fast = cls(cfgs[0], args.dim).to(device)
            slow = cls(cfgs[1], args.dim).to(device)
            slow.load_state_dict(fast.state_dict())
            x = torch.randn(2, t, args.dim, device=device)
            mask = torch.ones(2, t, dtype=torch.bool, device=device)
            mask[1, t - t // 5:] = False
            grad = torch.randn(2, t, args.dim, device=device)
            outs = []
            for module in (fast, slow):
                xi = x.clone().requires_grad_()
                y = module(xi, mask=mask)
                y.backward(grad)
                outs.append((y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}))
            errs = {"out": rel(outs[0][0], outs[1][0]), "dx": rel(outs[0][1], outs[1][1])}
            errs.update({f"d{n}": rel(outs[0][2][n], outs[1][2][n]) for n in outs[1][2] if outs[1][2][n] is not None})
            entry = {"check": name, "T": t, "max_rel": max(errs.values()), **errs}
            rows.append(entry)
            print(json.dumps(entry), flush=True)
            rows += check_graphs(name, fast, cls, cfgs[0], t, args, device)
    return rows


def check_graphs(name, module, cls, cfg, t, args, device) -> list[dict]:
    """The module replayed from CUDA graphs (capture on the first call, replays after, fresh inputs each
    time) against the same weights run eagerly, float32 and under bf16 autocast: output and gradients."""
    import dataclasses

    eager = cls(dataclasses.replace(cfg, cuda_graphs=False), args.dim).to(device)
    eager.load_state_dict(module.state_dict())
    rows = []
    for amp in (False, True):
        got = {}
        for label, mod in (("graphs", module), ("eager", eager)):
            for step in range(3):  # the last step compares: replays with new inputs
                torch.manual_seed(step)
                x = torch.randn(1, t, args.dim, device=device, requires_grad=True)
                mod.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    y = mod(x)
                y.float().square().mean().backward()
            got[label] = (y.detach(), x.grad, {n: p.grad for n, p in mod.named_parameters()})
        with torch.no_grad():
            torch.manual_seed(9)
            x = torch.randn(1, t, args.dim, device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                no_grad = [rel(module(x), eager(x)) for _ in range(2)][-1]
        g, e = got["graphs"], got["eager"]
        errs = {"out": rel(g[0], e[0]), "dx": rel(g[1], e[1]), "no_grad_out": no_grad,
                **{f"d{n}": rel(g[2][n], e[2][n]) for n in e[2] if e[2][n] is not None}}
        entry = {"check": f"{name} cuda graphs vs eager", "autocast_bf16": amp, "T": t,
                 "max_rel": max(errs.values()), "graphs_captured": len(module._graphs.entries), **errs}
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    return rows


def profile(block: nn.Module, t: int, dim: int, dtype: str, device: torch.device, top: int) -> None:
    """One forward + backward under torch.profiler: the top kernels by device time and the launch count."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.randn(1, t, dim, device=device, requires_grad=True)
    fn = Autocast(block, dtype == "bf16")
    fn(x).sum().backward()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=70), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--routed-q", type=int, default=1024)
    p.add_argument("--routed-kv", type=int, default=1024)
    p.add_argument("--light-window", type=int, default=64, help="local window (sees the window on each side)")
    p.add_argument("--ar-window", type=int, default=128)
    p.add_argument("--ar-q-per-window", type=int, default=32)
    p.add_argument("--router-iters", type=int, default=50)
    p.add_argument("--backend", default="auto", help="coordinate-descent backend of the routers")
    p.add_argument("--seq-lens", type=int, nargs="*", default=[8192, 32768])
    p.add_argument("--ar-seq-lens", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    p.add_argument("--rows", nargs="*", default=["dense:bf16", "routed:bf16", "routed:fp32", "routed_ar:bf16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--graph", action="store_true", help="also time each row but the peer's under CUDA graphs")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, print each row's N most expensive GPU kernels (torch.profiler)")
    p.add_argument("--check", action="store_true",
                   help="first compare the Triton routers' modules with the PyTorch ones (float32, outputs and "
                        "gradients) at --check-seq-lens")
    p.add_argument("--check-seq-lens", type=int, nargs="*", default=[4096])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.dim, args.heads, args.routed_q, args.routed_kv = 32, 2, 16, 16
        args.light_window, args.ar_window, args.ar_q_per_window = 16, 16, 4
        args.seq_lens, args.ar_seq_lens, args.warmup, args.iters = [128], [128, 256], 1, 2
        args.router_iters, args.check_seq_lens = 10, [40]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    checks = []
    if args.check:
        try:
            checks = check(args, device)
        except Exception as err:  # reported; the timings still run
            traceback.print_exc()
            checks = [{"check": "failed", "error": f"{type(err).__name__}: {err}"}]
    results = []
    for row in args.rows:
        kind, dtype = row.split(":")
        causal = kind in ("routed_ar", "peer_ar")
        graphs = [False, True] if args.graph and device.type == "cuda" and kind != "peer_ar" else [False]
        for t, graph in ((t, g) for t in (args.ar_seq_lens if causal else args.seq_lens)
                         for g in graphs):
            entry = {"module": kind, "dtype": dtype, "T": t, "cuda_graph": graph}
            block = None
            try:
                torch.manual_seed(0)
                block = build(kind, args.dim, args).to(device)
                entry["ms"], entry["peak_mib"] = measure(block, t, args.dim, dtype, device, args.warmup,
                                                         args.iters, graph)
                if args.profile and not graph:
                    profile(block, t, args.dim, dtype, device, args.profile)
            except Exception as err:  # a row that fails (e.g. out of memory) is reported, not fatal
                entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            finally:
                block = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(entry)
            print(json.dumps(entry), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}, torch {torch.__version__}, dim {args.dim}, heads {args.heads}+{args.heads}, "
          f"routed q/kv {args.routed_q}/{args.routed_kv}, backend {args.backend}\n")
    print("| module | dtype | CUDA graph | T | fwd+bwd ms | peak MiB |\n|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r['ms']:.2f}", f"{r['peak_mib']:.0f}"] if "ms" in r else [r["error"], ""]
        print(f"| {r['module']} | {r['dtype']} | {'yes' if r['cuda_graph'] else 'no'} | {r['T']} | "
              + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "args": {
            k: str(v) for k, v in vars(args).items()}, "checks": checks, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
