"""Linear attention in linear time and memory: non-causal sums, causal chunks, recurrent steps.

Causal form, chunks of C tokens (N = T / C chunks):
    intra-chunk  a masked C x C product  (phi_q phi_k^T * tril) v
    inter-chunk  phi_q S_prev, where S_prev = sum over earlier chunks of phi_k^T v   (F x Dv per chunk)
so nothing of size T x T or T x F x Dv exists; memory is O(T (F + Dv) + N F Dv), time O(T C F + T F Dv).

Performer keys carry a log scale (see features.featurize_qk). Each query i rescales by R_i, the
running max of the key log scales up to i, so every exponent is <= 0 (no overflow) and output i
depends on keys <= i only, bit for bit. The state S is kept in the scale of R at the chunk's end and
rescaled by exp(R_prev - R_new) <= 1 as it moves on, as online softmax does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from attention.config import ConfigError
from attention.linear.features import featurize_qk


class LinearState(NamedTuple):
    """Recurrent state after some tokens. S: (B, H, F, Dv) sum of phi(k) v^T; z: (B, H, F) sum of
    phi(k); key_max: (B, H) running max of key log scales (Performer; S and z are stored divided by
    exp(key_max)), None for the other feature maps."""

    S: torch.Tensor
    z: torch.Tensor
    key_max: torch.Tensor | None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in float32 at least: sums over thousands of keys in fp16/bf16 lose the small terms."""
    return torch.promote_types(x.dtype, torch.float32)


def _normalise(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    # A floor, not an offset: when den >= eps the stabilisers' common scale cancels exactly, so the
    # result does not depend on how keys were stabilised; den = 0 (no key seen, dead relu) gives 0.
    return num / den.clamp_min(eps)[..., None]


def _mask_keys(phi_k, key_log_weight, key_mask):
    if key_mask is None:
        return phi_k, key_log_weight
    keep = key_mask.bool()[:, :, None]  # (B, S, 1)
    phi_k = phi_k * keep[..., None].to(phi_k.dtype)
    if key_log_weight is not None:
        key_log_weight = key_log_weight.masked_fill(~keep, float("-inf"))
    return phi_k, key_log_weight


def _linear_noncausal(phi_q, phi_k, v, key_log_weight, eps):
    if key_log_weight is not None:
        # One stabiliser per (batch, head) over the real keys; every query sees all of them.
        key_max = key_log_weight.amax(1, keepdim=True).clamp_min(torch.finfo(phi_k.dtype).min)
        phi_k = phi_k * torch.exp(key_log_weight - key_max)[..., None]
    kv = torch.einsum("bshf,bshd->bhfd", phi_k, v)  # (B, H, F, Dv)
    z = phi_k.sum(1)  # (B, H, F)
    num = torch.einsum("bthf,bhfd->bthd", phi_q, kv)
    den = torch.einsum("bthf,bhf->bth", phi_q, z)
    return _normalise(num, den, eps)


def _chunks(x: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """(B, T, H, ...) -> (B, H, N, C, ...), the tail padded with `fill` up to a whole chunk."""
    pad = (-x.shape[1]) % size
    if pad:
        widths = [0, 0] * (x.dim() - 2) + [0, pad]
        x = F.pad(x, widths, value=fill)
    return rearrange(x, "b (n c) h ... -> b h n c ...", c=size)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the chunks strictly before each chunk (state entering it)."""
    shifted = torch.narrow(x, dim, 0, x.shape[dim] - 1).cumsum(dim)
    return torch.cat([torch.zeros_like(torch.narrow(x, dim, 0, 1)), shifted], dim)


def _rescaled_scan(kv, z, chunk_max):
    """State entering each chunk, in the scale of the previous chunk's end (zeros for chunk 0).

    kv: (B, H, N, F, Dv), z: (B, H, N, F), chunk n's sums in scale chunk_max[n] (B, H, N),
    nondecreasing in n. A sequential scan over chunks, as the scale changes along the way: a plain
    cumsum would add sums of different scales (or overflow if brought to one)."""
    s_acc, z_acc = kv[:, :, 0], z[:, :, 0]
    s_in, z_in = [torch.zeros_like(s_acc)], [torch.zeros_like(z_acc)]
    for n in range(1, kv.shape[2]):
        s_in.append(s_acc)
        z_in.append(z_acc)
        decay = torch.exp(chunk_max[:, :, n - 1] - chunk_max[:, :, n])  # (B, H), <= 1
        s_acc = s_acc * decay[..., None, None] + kv[:, :, n]
        z_acc = z_acc * decay[..., None] + z[:, :, n]
    return torch.stack(s_in, 2), torch.stack(z_in, 2)


def _linear_causal(phi_q, phi_k, v, key_log_weight, eps, chunk_size):
    t = phi_q.shape[1]
    size = min(chunk_size, t)
    q, k, vc = _chunks(phi_q, size), _chunks(phi_k, size), _chunks(v, size)  # (B, H, N, C, F|Dv)
    tril = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()  # query c sees key s <= c
    scores = torch.einsum("bhncf,bhnsf->bhncs", q, k)  # (B, H, N, C, C)
    if key_log_weight is None:
        scores = scores.masked_fill(~tril, 0.0)
        kv = torch.einsum("bhnsf,bhnsd->bhnfd", k, vc)  # (B, H, N, F, Dv)
        s_in, z_in = _exclusive_cumsum(kv, 2), _exclusive_cumsum(k.sum(3), 2)
        inter_scale = None
    else:
        log_w = _chunks(key_log_weight, size, fill=float("-inf"))  # (B, H, N, C)
        # R_i: max log scale of the keys up to i; the floor keeps R finite before the first real key
        # (all exponents below stay <= 0, never -inf - -inf).
        running = torch.cummax(rearrange(log_w, "b h n c -> b h (n c)"), -1).values
        running = rearrange(running, "b h (n c) -> b h n c", c=size).clamp_min(torch.finfo(q.dtype).min)
        rel = log_w[..., None, :] - running[..., :, None]  # (B, H, N, C, C): key s for query c
        scores = scores * torch.exp(rel.masked_fill(~tril, float("-inf")))
        chunk_max = running[..., -1]  # (B, H, N)
        k = k * torch.exp(log_w - chunk_max[..., None])[..., None]  # in the scale of the chunk's end
        kv = torch.einsum("bhnsf,bhnsd->bhnfd", k, vc)
        s_in, z_in = _rescaled_scan(kv, k.sum(3), chunk_max)
        # Query c of chunk n has R_c >= the previous chunk's end scale; chunk 0's state is zero, any
        # scale <= R_c does.
        before = torch.cat([running[:, :, :1, 0], chunk_max[:, :, :-1]], 2)  # (B, H, N)
        inter_scale = torch.exp(before[..., None] - running)  # (B, H, N, C), <= 1
    inter_num = torch.einsum("bhncf,bhnfd->bhncd", q, s_in)  # queries against the state before the chunk
    inter_den = torch.einsum("bhncf,bhnf->bhnc", q, z_in)
    if inter_scale is not None:
        inter_num, inter_den = inter_num * inter_scale[..., None], inter_den * inter_scale
    num = torch.einsum("bhncs,bhnsd->bhncd", scores, vc) + inter_num
    den = scores.sum(-1) + inter_den
    out = _normalise(num, den, eps)
    return rearrange(out, "b h n c d -> b (n c) h d")[:, :t]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     feature_map: str = "elu", key_mask: torch.Tensor | None = None, chunk_size: int = 64,
                     eps: float = 1e-6, projection: torch.Tensor | None = None) -> torch.Tensor:
    """Linear attention on q: (B, T, H, D), k: (B, S, H, D), v: (B, S, H, Dv) -> (B, T, H, Dv).

    out_i = phi(q_i) . sum_j phi(k_j) v_j^T / max(phi(q_i) . sum_j phi(k_j), eps), j over the real
    keys (key_mask (B, S) bool, True = real), j <= i when causal (needs S == T). The feature map is
    applied inside: "elu", "relu", "performer" (needs projection (m, D), e.g. PerformerFeatures's
    buffer) or "identity" (q and k already are non-negative features). Computes in float32 at least
    and returns q's dtype."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal linear attention needs as many keys as queries, got {k.shape[1]} "
                         f"keys for {q.shape[1]} queries")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size: must be >= 1, got {chunk_size}")
    dtype = compute_dtype(q)
    phi_q, phi_k, key_log_weight = featurize_qk(q.to(dtype), k.to(dtype), feature_map, projection)
    phi_k, key_log_weight = _mask_keys(phi_k, key_log_weight, key_mask)
    if causal:
        out = _linear_causal(phi_q, phi_k, v.to(dtype), key_log_weight, eps, chunk_size)
    else:
        out = _linear_noncausal(phi_q, phi_k, v.to(dtype), key_log_weight, eps)
    return out.to(q.dtype)


def init_linear_state(batch: int, heads: int, nb_features: int, dim_value: int, *, performer: bool,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> LinearState:
    """The empty state (no token seen yet), accumulating in float32 at least."""
    dtype = torch.promote_types(dtype, torch.float32)
    S = torch.zeros(batch, heads, nb_features, dim_value, device=device, dtype=dtype)
    z = torch.zeros(batch, heads, nb_features, device=device, dtype=dtype)
    key_max = torch.full((batch, heads), torch.finfo(dtype).min, device=device, dtype=dtype) if performer else None
    return LinearState(S, z, key_max)


def linear_attention_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: LinearState, *,
                          feature_map: str = "elu", eps: float = 1e-6,
                          projection: torch.Tensor | None = None) -> tuple[torch.Tensor, LinearState]:
    """One causal decoding step, O(1) in the tokens seen: q_t, k_t: (B, H, D), v_t: (B, H, Dv).

    Returns (out_t (B, H, Dv), new state); equals row t of linear_attention(causal=True)."""
    dtype = state.S.dtype
    phi_q, phi_k, log_w = featurize_qk(q_t[:, None].to(dtype), k_t[:, None].to(dtype), feature_map, projection)
    phi_q, phi_k, v_t = phi_q[:, 0], phi_k[:, 0], v_t.to(dtype)  # (B, H, F), (B, H, Dv)
    S, z, key_max = state
    if log_w is not None:
        log_w = log_w[:, 0]  # (B, H)
        new_max = torch.maximum(key_max, log_w)
        decay = torch.exp(key_max - new_max)
        phi_k = phi_k * torch.exp(log_w - new_max)[..., None]
        S, z, key_max = S * decay[..., None, None], z * decay[..., None], new_max
    S = S + phi_k[..., :, None] * v_t[..., None, :]
    z = z + phi_k
    num = torch.einsum("bhf,bhfd->bhd", phi_q, S)
    den = torch.einsum("bhf,bhf->bh", phi_q, z)
    return _normalise(num, den, eps).to(q_t.dtype), LinearState(S, z, key_max)
