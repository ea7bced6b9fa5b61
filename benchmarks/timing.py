"""Timing and memory helpers shared by the benchmarks (never used by tests: performance is measured,
not asserted).

On a GPU, times are CUDA-event timings of single calls, optionally with the L2 cache flushed first so
no call reads what the previous one left there; on the CPU, wall-clock times. Peak memory is the
allocator's high-water mark of one call above what was allocated before it."""

from __future__ import annotations

import functools
import statistics
import time

import torch


@functools.cache
def _l2_flusher(device: str) -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # larger than any GPU's L2


def median_ms(fn, *, warmup: int, iters: int, device: torch.device | str, flush_l2: bool = True) -> float:
    """Median milliseconds of `iters` calls of fn after `warmup` calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        if flush_l2:
            _l2_flusher(str(device)).zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn, device: torch.device | str) -> float | None:
    """Extra GPU memory (MiB) one call of fn reaches above what was allocated before it; None on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def count_kernels(fn, device: torch.device | str) -> int | None:
    """GPU kernels (and memsets/copies) one call of fn launches; None on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
