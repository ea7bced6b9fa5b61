"""Local attention computed window by window: memory linear in T, never a T x T matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from attention.backend import resolve
from attention.layers import MultiheadMixer


def look_around(x: torch.Tensor, dim: int, look_backward: int, look_forward: int,
                pad_value: float | bool | int) -> torch.Tensor:
    """For each window along `dim`, the concatenation of windows n - look_backward .. n + look_forward.

    x: (..., N, W, ...) with windows on `dim` and positions in a window on `dim + 1`.
    Returns (..., N, L * W, ...), L = look_backward + 1 + look_forward; windows before the start or
    after the end are filled with `pad_value`. Costs L copies of x: linear in T."""
    n = x.shape[dim]

    def filler(count: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = count
        return x.new_full(shape, pad_value)

    padded = torch.cat([filler(look_backward), x, filler(look_forward)], dim=dim)  # N + L - 1 windows
    return torch.cat([padded.narrow(dim, i, n) for i in range(look_backward + look_forward + 1)], dim=dim + 1)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int,
                    look_backward: int = 1, look_forward: int = 0, causal: bool = False,
                    key_mask: torch.Tensor | None = None, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Sliding-window attention. q, k, v: (B, T, H, D); key_mask: (B, T) bool, True = real.

    backend (attention.backend.resolve): 'triton' runs the fused kernel (attention/local/kernel.py);
    'auto' runs it on CUDA when it takes the inputs (float16/bfloat16/float32, or autocast, and D <= 128)
    and the blocked PyTorch computation below otherwise; 'reference' always runs the PyTorch one.

    Same result as `local_attention_reference` (the dense masked form): query i sees key j iff
    win(j) is in [win(i) - look_backward, win(i) + look_forward] (and j <= i when causal). Returns
    (B, T, H, D); a query that sees no key gets zeros. The PyTorch path's scores are
    (B, H, T / W, W, L * W): memory O(T * L * W), not O(T^2); the kernel keeps none."""
    if resolve(backend, q) == "triton":
        from attention.local.kernel import kernel_supports, local_attention_triton  # needs triton: lazy

        if backend == "triton" or kernel_supports(q, k, v):
            return local_attention_triton(q, k, v, window_size=window_size, look_backward=look_backward,
                                          look_forward=look_forward, causal=causal, key_mask=key_mask,
                                          scale=scale)
    b, t, h, d = q.shape
    if k.shape[1] != t or v.shape[1] != t:
        raise ValueError(f"local attention is self-attention: q has {t} positions, k {k.shape[1]}, "
                         f"v {v.shape[1]}; they must match")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    w = window_size
    n = -(-t // w)
    pad = n * w - t
    # Pad T up to a whole number of windows; padded keys are masked out, padded queries cut off at the end.
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    q_win = rearrange(q, "b (n w) h d -> b h n w d", w=w)  # (B, H, N, W, D)
    k_win = look_around(rearrange(k, "b (n w) h d -> b h n w d", w=w), 2, look_backward, look_forward, 0.0)
    v_win = look_around(rearrange(v, "b (n w) h d -> b h n w d", w=w), 2, look_backward, look_forward, 0.0)
    # k_win, v_win: (B, H, N, L*W, D)

    pos = torch.arange(n * w, device=q.device).view(n, w)  # (N, W) query positions
    key_pos = look_around(pos, 0, look_backward, look_forward, -1)  # (N, L*W); -1 = outside the sequence
    allowed = ((key_pos >= 0) & (key_pos < t))[:, None, :]  # (N, 1, L*W)
    if causal:
        allowed = allowed & (key_pos[:, None, :] <= pos[:, :, None])  # (N, W, L*W)
    allowed = allowed[None, None]  # (1, 1, N, W or 1, L*W)
    if key_mask is not None:
        real = F.pad(key_mask.bool(), (0, pad), value=False).view(b, n, w)  # (B, N, W)
        real = look_around(real, 1, look_backward, look_forward, False)  # (B, N, L*W)
        allowed = allowed & real[:, None, :, None, :]  # (B, 1, N, W or 1, L*W)

    scores = torch.einsum("bhnid,bhnjd->bhnij", q_win, k_win) * scale  # (B, H, N, W, L*W)
    # A finite fill (not -inf) keeps rows with no visible key NaN-free in forward and backward; the
    # product with `allowed` then zeroes those rows.
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1) * allowed
    out = torch.einsum("bhnij,bhnjd->bhnid", probs.to(v_win.dtype), v_win)  # (B, H, N, W, D)
    return rearrange(out, "b h n w d -> b (n w) h d")[:, :t]


class LocalAttention(MultiheadMixer):
    """Multi-head sliding-window self-attention, causal or not, with a key padding mask. No cross
    attention: a window over another sequence has no meaning."""

    cross = False

    def attend(self, q, k, v, *, causal, key_mask):
        return local_attention(q, k, v, window_size=self.cfg.window_size, look_backward=self.cfg.look_backward,
                               look_forward=self.cfg.forward_windows, causal=causal, key_mask=key_mask,
                               backend=self.cfg.backend)
