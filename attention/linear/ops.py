"""The public linear attention ops: the Triton kernels (kernel.py) on CUDA, the PyTorch path (chunked.py)
elsewhere. The PyTorch path is the reference the kernels are tested against (itself tested against the
quadratic reference.py)."""

from __future__ import annotations

import torch

from attention.backend import resolve
from attention.linear import chunked
from attention.linear.chunked import LinearState


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     feature_map: str = "elu", key_mask: torch.Tensor | None = None, chunk_size: int = 64,
                     eps: float = 1e-6, projection: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Linear attention on q: (B, T, H, D), k: (B, S, H, D), v: (B, S, H, Dv) -> (B, T, H, Dv).

    Semantics: chunked.linear_attention (feature maps, key_mask, eps floor, causal needs S == T).
    backend (attention.backend.resolve): 'triton' runs the fused kernel (kernel.py: elu, relu, identity;
    D, Dv <= 128); 'auto' runs it on CUDA when it takes the inputs and the PyTorch path otherwise
    (Performer features, float64, wider heads); 'reference' always runs the PyTorch path. chunk_size
    applies to the PyTorch path; the kernel picks its own chunks (kernel.default_tiles)."""
    if resolve(backend, q) == "triton":
        from attention.linear.kernel import kernel_supports, linear_attention_triton  # needs triton: lazy

        if backend == "triton" or kernel_supports(q, k, v, feature_map):
            return linear_attention_triton(q, k, v, causal=causal, feature_map=feature_map, key_mask=key_mask,
                                           eps=eps)
    return chunked.linear_attention(q, k, v, causal=causal, feature_map=feature_map, key_mask=key_mask,
                                    chunk_size=chunk_size, eps=eps, projection=projection)


def _step_kernel_applies(q_t, k_t, v_t, state: LinearState, feature_map: str) -> bool:
    from attention.linear.kernel import FEATURE_CODES, KERNEL_DTYPES, MAX_HEAD_DIM

    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_t, k_t, v_t, state.S, state.z))
    return (feature_map in FEATURE_CODES and state.key_max is None and state.S.dtype == torch.float32
            and q_t.dtype in KERNEL_DTYPES and q_t.dtype == k_t.dtype == v_t.dtype
            and max(q_t.shape[-1], v_t.shape[-1]) <= MAX_HEAD_DIM and not needs_grad)


def linear_attention_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: LinearState, *,
                          feature_map: str = "elu", eps: float = 1e-6, projection: torch.Tensor | None = None,
                          backend: str = "auto") -> tuple[torch.Tensor, LinearState]:
    """One causal decoding step, O(1) in the tokens seen: q_t, k_t: (B, H, D), v_t: (B, H, Dv).

    Returns (out_t (B, H, Dv), new state), row t of linear_attention(causal=True). The Triton step
    (one launch: state update and readout) runs for elu, relu, identity on a float32 state without
    autograd; everything else (Performer, gradients through the state) runs the PyTorch step."""
    if resolve(backend, q_t) == "triton":
        from attention.linear.kernel import linear_step_triton

        if backend == "triton" or _step_kernel_applies(q_t, k_t, v_t, state, feature_map):
            out, s, z = linear_step_triton(q_t, k_t, v_t, state.S, state.z, feature_map=feature_map, eps=eps)
            return out, LinearState(s, z, None)
    return chunked.linear_attention_step(q_t, k_t, v_t, state, feature_map=feature_map, eps=eps,
                                         projection=projection)
