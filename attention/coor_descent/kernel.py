"""Triton kernels of coordinate descent: the (rows, n) routing op (kernel_rows.py) and the fused attention,
its forward launches in kernel_attention.py, its backward in kernel_attention_bwd.py, tied together here
as an autograd function. Same semantics as reference.py, with no (T, S) tensor. Importing this module
needs triton; ops.py imports it lazily."""

from __future__ import annotations

import math
import os

import torch

from attention.coor_descent.kernel_attention import attention_config, attention_forward
from attention.coor_descent.kernel_attention_bwd import attention_backward, grouped_start
from attention.coor_descent.kernel_rows import coor_descent_triton, eps_schedule, eps_tensor

__all__ = ["coor_descent_attention_triton", "coor_descent_triton"]


class CoorDescentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, topk, eps_list, n_iters, scale, causal, cfg):
        eps_sched = eps_tensor(eps_list, q.device)
        out, stats, rows = attention_forward(q, k, v, key_mask, topk, eps_sched, n_iters, scale,
                                             causal, cfg)
        ctx.save_for_backward(q, k, v, out, stats, rows, eps_sched,
                              *(() if key_mask is None else (key_mask,)))
        ctx.config = (n_iters, scale, causal, cfg, eps_list)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, stats, rows, eps_sched, *maybe_km = ctx.saved_tensors
        n_iters, scale, causal, cfg, eps_list = ctx.config
        key_mask = maybe_km[0] if maybe_km else None
        dq, dk, dv = attention_backward(q, k, v, out, grad_out.contiguous(), key_mask, stats, rows, eps_sched,
                                        grouped_start(eps_list, n_iters), n_iters, scale, causal, cfg)
        return dq, dk, dv, None, None, None, None, None, None, None


def coor_descent_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                                  n_iters: int, eps: float, eps_init: float | None = None,
                                  eps_decay: float = 1.0, causal: bool = False,
                                  key_mask: torch.Tensor | None = None, scale: float | None = None,
                                  tiles: dict | None = None) -> torch.Tensor:
    """Same semantics as coor_descent_attention_reference. q: (B, T, H, D), k, v: (B, S, H, D)
    float16/bfloat16/float32 (fp32 accumulation), key_mask: (B, S) bool. tiles: overrides of
    attention_config's entries, e.g. {"fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4}}."""
    if n_iters < 1:
        raise ValueError(f"n_iters: must be >= 1, got {n_iters}")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    if topk < 1:
        raise ValueError(f"topk: must be >= 1, got {topk}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v: dtypes {q.dtype}, {k.dtype}, {v.dtype}; allowed: one of float16, "
                        "bfloat16, float32 for all three")
    bsz, t, h, d = q.shape
    if k.shape[0] != bsz or k.shape[2:] != (h, d) or v.shape != k.shape:
        raise ValueError(f"k, v: expected (B, S, H, D) = ({bsz}, S, {h}, {d}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if not scale > 0:
        raise ValueError(f"scale: must be > 0, got {scale}")
    if key_mask is not None:
        if key_mask.shape != (bsz, k.shape[1]):
            raise ValueError(f"key_mask: expected shape ({bsz}, {k.shape[1]}), got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(torch.bool).contiguous().view(torch.uint8)
    cfg = attention_config(q.dtype, d, os.environ.get("TRITON_INTERPRET", "0") == "1")
    cfg.update(tiles or {})
    eps_list = eps_schedule(n_iters, eps, eps_init, eps_decay)
    return CoorDescentAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), key_mask, topk,
                                      eps_list, n_iters, float(scale), causal, cfg)
