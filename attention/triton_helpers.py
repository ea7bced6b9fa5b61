"""Triton helpers every attention kernel's program starts with."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def batch_head(H):
    """The grid's second axis runs over batch x heads: this program's row bh, and its batch and head as
    int64 (they multiply strides: int32 offsets overflow past 2**31 elements)."""
    bh = tl.program_id(1)
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)
