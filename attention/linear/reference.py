"""Linear attention in its naive quadratic form: the ground truth for the chunked and recurrent forms.

An explicit (T x S) matrix A_ij = phi(q_i) . phi(k_j), zero where key j is padded or (causal) j > i,
then out_i = sum_j A_ij v_j / max(sum_j A_ij, eps).
"""

from __future__ import annotations

import torch
from einops import rearrange

from attention.linear.features import featurize_qk


def visible_keys(t: int, s: int, causal: bool, key_mask: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S): True where query i may use key j."""
    allowed = torch.ones(1, 1, t, s, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(t, s, dtype=torch.bool, device=device).tril()
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    return allowed


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                               feature_map: str = "elu", key_mask: torch.Tensor | None = None,
                               eps: float = 1e-6, projection: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, T, H, D), k: (B, S, H, D), v: (B, S, H, Dv) -> (B, T, H, Dv), computed in q's dtype.

    Same arguments and meaning as attention.linear.linear_attention (without chunk_size)."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal linear attention needs as many keys as queries, got {k.shape[1]} "
                         f"keys for {q.shape[1]} queries")
    phi_q, phi_k, key_log_weight = featurize_qk(q, k, feature_map, projection)
    allowed = visible_keys(q.shape[1], k.shape[1], causal, key_mask, q.device)  # (B|1, 1, T, S)
    scores = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)  # (B, H, T, S)
    if key_log_weight is not None:
        # Performer keys: phi(k_j) = phi_k_j * exp(w_j). Scale each query's row by the max w_j over
        # the keys it sees, a constant per row that cancels in the normalisation (the chunked form
        # uses the same running max, so both agree to rounding even where the eps floor acts).
        log_w = rearrange(key_log_weight, "b s h -> b h 1 s").masked_fill(~allowed, float("-inf"))
        row_max = log_w.amax(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).min)  # (B, H, T, 1)
        scores = scores * torch.exp(log_w - row_max)
    scores = scores.masked_fill(~allowed, 0.0)
    num = torch.einsum("bhts,bshd->bthd", scores, v)
    den = rearrange(scores.sum(-1), "b h t -> b t h")
    return num / den.clamp_min(eps)[..., None]
