"""Top-k attention processed in query chunks, forward and backward: peak memory chunk x S, not T x S.

Backward is written by hand (Gupta et al. 2021): autograd would keep every chunk's (chunk, S) tensors
for backward, which adds up to T x S again. Here only the kept indices and probabilities (T x k) are
saved, and each chunk's dense (chunk, S) tensors are rebuilt from them in backward.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from attention.backend import resolve
from attention.layers import MultiheadMixer


def _visible_keys(start: int, stop: int, t: int, s: int, causal: bool, key_mask: torch.Tensor | None,
                  device: torch.device) -> torch.Tensor | None:
    """(B or 1, 1, stop - start, S) bool for queries start..stop-1, True = may attend; None = all.

    Causal alignment is to the end, as in softmax attention: query i sees keys j <= i + (S - T)."""
    allowed = None
    if causal:
        i = torch.arange(start, stop, device=device)[:, None]
        j = torch.arange(s, device=device)[None, :]
        allowed = (j <= i + (s - t))[None, None]
    if key_mask is not None:
        real = key_mask[:, None, None, :].bool()
        allowed = real if allowed is None else allowed & real
    return allowed


def _spread(values: torch.Tensor, idx: torch.Tensor, s: int) -> torch.Tensor:
    """(B, H, C, K) values at key indices idx -> dense (B, H, C, S), zeros elsewhere."""
    dense = values.new_zeros(*values.shape[:-1], s)
    return dense.scatter_(-1, idx, values)


class _TopkAttentionFunction(torch.autograd.Function):
    """q: (B, H, T, D), k, v: (B, H, S, D) -> (B, H, T, D)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, topk, causal, query_chunk, scale):
        b, h, t, _ = q.shape
        s = k.shape[2]
        n_keep = min(topk, s)
        out = q.new_empty(b, h, t, v.shape[-1])
        kept_idx = torch.empty(b, h, t, n_keep, dtype=torch.long, device=q.device)
        kept_prob = q.new_empty(b, h, t, n_keep)
        softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # half inputs: softmax in float32
        for start in range(0, t, query_chunk):
            stop = min(t, start + query_chunk)
            scores = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scale  # (B, H, C, S)
            allowed = _visible_keys(start, stop, t, s, causal, key_mask, q.device)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            # torch.topk returns exactly n_keep indices even under ties. A row with fewer visible keys
            # picks some -inf ones, which get probability 0; a row with none is all NaN -> 0.
            top_scores, idx = scores.topk(n_keep, dim=-1)  # (B, H, C, K)
            prob = top_scores.to(softmax_dtype).softmax(dim=-1).nan_to_num(0.0).to(q.dtype)
            kept_idx[:, :, start:stop] = idx
            kept_prob[:, :, start:stop] = prob
            out[:, :, start:stop] = _spread(prob, idx, s) @ v
        ctx.save_for_backward(q, k, v, kept_idx, kept_prob)
        ctx.query_chunk, ctx.scale = query_chunk, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, kept_idx, kept_prob = ctx.saved_tensors
        t, s = q.shape[2], k.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)  # sums over chunks in at least float32
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for start in range(0, t, ctx.query_chunk):
            stop = min(t, start + ctx.query_chunk)
            idx, prob = kept_idx[:, :, start:stop], kept_prob[:, :, start:stop]  # (B, H, C, K)
            g = grad_out[:, :, start:stop]  # (B, H, C, D)
            dv += (_spread(prob, idx, s).transpose(-1, -2) @ g).to(acc)
            dprob = (g @ v.transpose(-1, -2)).gather(-1, idx)  # (B, H, C, K)
            # softmax backward over the kept keys only; dropped keys had no gradient path
            dscore = prob * (dprob - (prob * dprob).sum(dim=-1, keepdim=True))
            dscores = _spread(dscore, idx, s) * ctx.scale  # (B, H, C, S)
            dq[:, :, start:stop] = dscores @ k
            dk += (dscores.transpose(-1, -2) @ q[:, :, start:stop]).to(acc)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int, causal: bool = False,
                   key_mask: torch.Tensor | None = None, query_chunk: int = 1024,
                   scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Top-k attention. q: (B, T, H, D); k, v: (B, S, H, D); key_mask: (B, S) bool, True = real key.

    Same result as `topk_attention_reference`. backend 'reference' (and 'auto' off CUDA): the chunked
    PyTorch op above, peak memory B*H*query_chunk*S in forward and backward. 'auto' on CUDA (or
    'triton'): thresholds per row, then flex_attention's fused kernels (flex.py; on the CPU under
    'triton', flex runs eagerly, forward only). Returns (B, T, H, D)."""
    if topk < 1 or query_chunk < 1:
        raise ValueError(f"topk_attention: topk and query_chunk must be >= 1, got {topk} and {query_chunk}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # (B, H, T, D); one dtype for all three, and no autocast inside: the function picks its own precision
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k.to(q.dtype), v.to(q.dtype)))
    with torch.autocast(q.device.type, enabled=False):
        if resolve(backend, q) == "triton":
            from attention.topk.flex import topk_attention_flex

            out = topk_attention_flex(qh, kh, vh, topk=topk, causal=causal, key_mask=key_mask, scale=scale,
                                      query_chunk=query_chunk, compiled=q.is_cuda)
        else:
            out = _TopkAttentionFunction.apply(qh, kh, vh, key_mask, topk, causal, query_chunk, scale)
    return out.transpose(1, 2)


class TopkAttention(MultiheadMixer):
    """Multi-head top-k attention: self or cross (context), causal or not, key padding mask."""

    def attend(self, q, k, v, *, causal, key_mask):
        return topk_attention(q, k, v, topk=self.cfg.k, causal=causal, key_mask=key_mask,
                              query_chunk=self.cfg.query_chunk, backend=self.cfg.backend)
