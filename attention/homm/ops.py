"""HoMM's functional core on (B, T, F) moment features: linear in T, causal by cumulative sums.

The original (davidpicard/HoMM) averages causally with a dense (T x T) triangular mask; a running
sum and count give the same averages in O(T F) time and memory, and an O(F) decoding step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from attention.backend import resolve


class MomentState(NamedTuple):
    """Decoding state: total (B, F) sum of the moments of the tokens seen, count (B, 1) how many."""

    total: torch.Tensor
    count: torch.Tensor


def expand_moments(h: torch.Tensor, order: int) -> torch.Tensor:
    """(..., order * E) activated projections -> (..., order * E) moment features.

    Group o (1-based) becomes the elementwise product of groups 1..o: an o-th order monomial of the
    token in a low-rank expanded space, as in the original's running product over chunks."""
    groups = list(h.chunk(order, dim=-1))
    for o in range(1, order):
        groups[o] = groups[o] * groups[o - 1]
    return torch.cat(groups, dim=-1)


def moment_mix(moments: torch.Tensor, select: torch.Tensor, *, causal: bool = False,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """select_t * (mean of moments_s over real tokens s; s <= t when causal) -> (B, T, F).

    moments: (B, S, F) from the context, select: (B, T, F) gates in [0, 1], key_mask: (B, S) bool
    (True = real token): padded tokens count neither in the sums nor in the counts. A query that
    sees no real token gets 0. Causal needs S == T. Sums run in float32 at least."""
    if causal and moments.shape[1] != select.shape[1]:
        raise ValueError(f"causal moment mixing needs as many context tokens as queries, got "
                         f"{moments.shape[1]} for {select.shape[1]}")
    dtype = torch.promote_types(moments.dtype, torch.float32)
    moments = moments.to(dtype)
    if key_mask is None:
        weight = torch.ones(moments.shape[:2], dtype=dtype, device=moments.device)  # (B, S)
    else:
        weight = key_mask.to(dtype)
        moments = moments * weight[..., None]
    if causal:
        total, count = moments.cumsum(1), weight.cumsum(1)  # (B, T, F), (B, T)
    else:
        total, count = moments.sum(1, keepdim=True), weight.sum(1, keepdim=True)  # (B, 1, F), (B, 1)
    mean = total / count.clamp_min(1.0)[..., None]
    return (select.to(dtype) * mean).to(select.dtype)


def homm_mix(hidden: torch.Tensor, select_logits: torch.Tensor, order: int, *, causal: bool = False,
             key_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """HoMM's whole mixing from the projections' pre-activations:
    moment_mix(expand_moments(GELU(hidden), order), sigmoid(select_logits), causal, key_mask).

    hidden: (B, S, order * E) (the moment projection, before GELU), select_logits: (B, T, order * E)
    (the selection projection, before the sigmoid), key_mask: (B, S) bool. Returns (B, T, order * E).
    backend (attention.backend.resolve): 'triton' runs the fused kernel (kernel.py: nothing per token
    but the inputs and the output is stored, in forward or backward); 'auto' runs it on CUDA for
    order <= 4 and float16/bfloat16/float32, the PyTorch composition otherwise; 'reference' always
    runs the PyTorch composition."""
    if resolve(backend, hidden) == "triton":
        from attention.homm.kernel import homm_mix_triton, kernel_supports  # needs triton: lazy

        if backend == "triton" or kernel_supports(hidden, select_logits, order):
            return homm_mix_triton(hidden, select_logits, order, causal=causal, key_mask=key_mask)
    return moment_mix(expand_moments(F.gelu(hidden), order), torch.sigmoid(select_logits), causal=causal,
                      key_mask=key_mask)


def init_moment_state(batch: int, width: int, *, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> MomentState:
    dtype = torch.promote_types(dtype, torch.float32)
    return MomentState(torch.zeros(batch, width, device=device, dtype=dtype),
                       torch.zeros(batch, 1, device=device, dtype=dtype))


def moment_step(moments_t: torch.Tensor, select_t: torch.Tensor,
                state: MomentState) -> tuple[torch.Tensor, MomentState]:
    """One causal step: moments_t, select_t (B, F) -> (select_t * running mean (B, F), new state)."""
    total = state.total + moments_t.to(state.total.dtype)
    count = state.count + 1.0
    return (select_t.to(total.dtype) * total / count).to(select_t.dtype), MomentState(total, count)
