"""Output buffers of the Triton kernels (every kernel allocates through `alloc`).

Tests set POISON_OUTPUTS: buffers then start as NaN, so an element a kernel forgets to write fails the
comparison against the reference instead of passing on whatever memory held."""

from __future__ import annotations

import torch

POISON_OUTPUTS = False


def alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
