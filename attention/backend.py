"""Backend choice shared by every op: the Triton kernel on CUDA, the PyTorch reference elsewhere.

A missing or broken Triton never breaks an import: kernels are imported lazily through here.
"""

from __future__ import annotations

import functools
import os

import torch

from attention.config import ConfigError

BACKENDS = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, x: torch.Tensor) -> str:
    """'reference' or 'triton' for an op on tensor `x`."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend: got {backend!r}, allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' asked for, but triton is not importable")
        if not x.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU")
    return backend
