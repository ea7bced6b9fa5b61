"""Time and peak memory of a module's forward and forward+backward.

Time: the median over `repeats` runs after `warmup` runs, synchronised on CUDA.
Memory: the peak of memory allocated while the pass runs, less what was allocated before it. On CUDA
the caching allocator's statistics; on the CPU, where PyTorch keeps none, the bytes of live tensor
storages created by operators, tracked through a dispatch mode (inputs and weights made before the
pass are not counted; scratch memory inside a fused kernel is not seen)."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2 ** 20


class LiveTensorBytes(TorchDispatchMode):
    """Counts the storage bytes of tensors that operators create, while they live; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, tuple[int, int]] = {}  # storage address -> (tensors alive on it, bytes)

    def _release(self, key: int) -> None:
        count, size = self._refs[key]
        if count == 1:
            del self._refs[key]
            self.live -= size
        else:
            self._refs[key] = (count - 1, size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:  # empty
                continue
            count, size = self._refs.get(key, (0, storage.nbytes()))
            if count == 0:  # a new storage; views and in-place results share an existing one
                self.live += size
                self.peak = max(self.peak, self.live)
            self._refs[key] = (count + 1, size)
            weakref.finalize(t, self._release, key)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB allocated at the peak of fn(), above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak / MIB
    tracker = LiveTensorBytes()
    with tracker:
        result = fn()
    del result
    return tracker.peak / MIB


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def forward_and_backward(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward and backward pass of `module` on `x` (which must require grad)."""
    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).float().square().mean().backward()
    return run


def forward_only(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return module(x)
    return run
