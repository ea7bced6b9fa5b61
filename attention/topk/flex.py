"""Top-k attention on CUDA through flex_attention: no (T, S) tensor in backward, causal blocks skipped.

Two passes. (1) Thresholds, no gradient: query chunks of the score matrix (keys up to the chunk's causal
end only), float32 accumulation (the products of bf16/fp16 inputs are exact in float32), and per row
the midpoint tau_i of its k-th and (k + 1)-th largest visible scores (-inf when it sees k keys or
fewer). (2) flex_attention with score_mod s -> s if s >= tau_i else -inf and a causal block mask:
softmax over exactly the kept keys, forward and backward in fused kernels (compiled once per shape).
The gradient is that of the reference: it flows through the kept scores only, tau is a constant.

The midpoint makes the selection robust to the two passes summing the same products in different
orders (float32, ~1e-7 relative): rows whose k-th and (k + 1)-th scores are closer than that, i.e.
ties, may keep both where torch.topk keeps one of them (README: failure modes).
"""

from __future__ import annotations

import functools

import torch

_BLOCK_MASKS: dict = {}


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _causal_block_mask(t: int, s: int, device: torch.device):
    key = (t, s, str(device))
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + (s - t)

        if len(_BLOCK_MASKS) > 16:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = create_block_mask(causal, None, None, t, s, device=device,
                                              _compile=device.type == "cuda")
    return _BLOCK_MASKS[key]


def _scores_float32(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, C, D) x (B, H, S, D) -> (B, H, C, S) float32 accumulated, inputs in their own dtype."""
    b, h, c, d = q.shape
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.bmm(q.reshape(b * h, c, d), k.reshape(b * h, -1, d).transpose(1, 2),
                             out_dtype=torch.float32).view(b, h, c, -1)
        except (RuntimeError, TypeError):  # no bmm with out_dtype in this torch: float32 inputs
            pass
    wide = torch.promote_types(q.dtype, torch.float32)
    return q.to(wide) @ k.to(wide).transpose(-1, -2)


@torch.no_grad()
def topk_thresholds(q: torch.Tensor, k: torch.Tensor, *, topk: int, causal: bool, key_mask: torch.Tensor | None,
                    scale: float, query_chunk: int) -> torch.Tensor:
    """q: (B, H, T, D), k: (B, H, S, D) -> tau (B, H, T) float32+: keep key j of row i iff s_ij >= tau_i."""
    b, h, t, _ = q.shape
    s = k.shape[2]
    wide = torch.promote_types(q.dtype, torch.float32)
    tau = torch.full((b, h, t), float("-inf"), dtype=wide, device=q.device)
    if topk >= s:
        return tau
    for start in range(0, t, query_chunk):
        stop = min(t, start + query_chunk)
        end = min(s, stop + (s - t)) if causal else s  # no query of the chunk sees a key past this
        if end <= topk:
            continue  # no row of the chunk sees more than k keys
        scores = _scores_float32(q[:, :, start:stop], k[:, :, :end])  # (B, H, C, end)
        scores.mul_(scale)
        if causal:  # in place, on the chunk's diagonal block only: keys before it are visible to all rows
            first = max(0, start + (s - t))
            i = torch.arange(start, stop, device=q.device)[:, None]
            future = torch.arange(first, end, device=q.device) > i + (s - t)  # (C, end - first)
            scores[..., first:].masked_fill_(future, float("-inf"))
        if key_mask is not None:
            scores.masked_fill_(~key_mask[:, None, None, :end].bool(), float("-inf"))
        top = scores.topk(topk + 1, dim=-1).values  # (B, H, C, k + 1), descending
        mid = 0.5 * (top[..., -2] + top[..., -1])  # -inf when the row sees k keys or fewer
        tau[:, :, start:stop] = torch.where(torch.isfinite(top[..., -1]), mid, float("-inf"))
    return tau


def topk_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int, causal: bool,
                        key_mask: torch.Tensor | None, scale: float, query_chunk: int,
                        compiled: bool = True) -> torch.Tensor:
    """q: (B, H, T, D), k, v: (B, H, S, D) -> (B, H, T, D), the semantics of topk_attention_reference.
    compiled=False runs flex_attention eagerly (CPU tests: forward only, flex has no CPU backward)."""
    from torch.nn.attention.flex_attention import flex_attention

    t, s = q.shape[2], k.shape[2]
    tau = topk_thresholds(q, k, topk=topk, causal=causal, key_mask=key_mask, scale=scale, query_chunk=query_chunk)
    if key_mask is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(score >= tau[b, h, q_idx], score, float("-inf"))
    else:
        real = key_mask.bool()

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where((score >= tau[b, h, q_idx]) & real[b, kv_idx], score, float("-inf"))

    block_mask = _causal_block_mask(t, s, q.device) if causal else None
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
