"""SEA's estimator: a Performer estimate of each query's attention in the compressed width P, refined by a
predictor network (MLP per token + CNN over the (time x cell) map), and the losses that train it.

Performer mass (no gradient; it is an input feature and the predictor's prior):
    est_ib = phi(q_i) . sum_{r in cell b of i} phi(k_r)  /  phi(q_i) . sum_{r < L_i} phi(k_r)
with phi the FAVOR+ features of attention.linear.features. Prefix sums Z_r = sum_{rank < r} phi(k) are
kept as log-cumsum-exp (a scan, so causal outputs depend on earlier keys only, bit for bit), and each
query reads Z at its P + 1 cell bounds: O(T P m) time, memory bounded by a chunk of queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attention.linear.features import performer_log_features
from attention.sea.geometry import KeyGeometry, bin_bounds, bin_of_rank, rank_of_position

# Gathered prefix sums per query chunk, B x C x (P + 1) x H x m: fewer, larger chunks on a GPU.
CHUNK_ELEMENTS = {"cuda": 2**26, "cpu": 2**24}


@torch.no_grad()
def performer_bin_mass(q: torch.Tensor, k: torch.Tensor, geometry: KeyGeometry, projection: torch.Tensor,
                       chunk_elements: int | None = None) -> torch.Tensor:
    """q: (B, T, H, D), k: (B, S, H, D), projection (m, D) -> (B, T, H, P): the Performer estimate of
    the attention mass in each cell (rows sum to 1; zeros for a query that sees no key), float32 at least."""
    # log-features and exp-sums in float32 at least, never bf16: autocast off on q's own device (a
    # decorator for "cuda" alone left CPU autocast on, and bf16 einsums then met float32 buffers)
    with torch.autocast(q.device.type, enabled=False):
        return _performer_bin_mass(q, k, geometry, projection, chunk_elements)


def _performer_bin_mass(q, k, geometry, projection, chunk_elements):
    chunk_elements = chunk_elements or CHUNK_ELEMENTS.get(q.device.type, CHUNK_ELEMENTS["cpu"])
    dtype = torch.promote_types(q.dtype, torch.float32)
    b, t, h, _ = q.shape
    s, m, p = k.shape[1], projection.shape[0], geometry.bins
    log_q = performer_log_features(q.to(dtype), projection.to(dtype))  # (B, T, H, m)
    log_k = performer_log_features(k.to(dtype), projection.to(dtype))  # (B, S, H, m)
    log_k = log_k.gather(1, geometry.rank_to_pos[:, :, None, None].expand(-1, -1, h, m))  # rank order
    n_real = geometry.visible.amax(1)  # (B,): no query sees more keys than there are real ones
    real_rank = torch.arange(s, device=q.device)[None] < n_real[:, None]
    log_k = log_k.masked_fill(~real_rank[:, :, None, None], float("-inf"))
    log_z = torch.logcumsumexp(log_k, dim=1)  # (B, S, H, m): log Z_{r+1}
    log_z = torch.cat([torch.full_like(log_z[:, :1], float("-inf")), log_z], 1)  # (B, S + 1, H, m)
    bounds = bin_bounds(geometry.visible, p)  # (B, T, P + 1)
    out = torch.empty(b, t, h, p, dtype=dtype, device=q.device)
    step = max(1, chunk_elements // max(1, b * (p + 1) * h * m))
    for c0 in range(0, t, step):
        c1 = min(t, c0 + step)
        idx = rearrange(bounds[:, c0:c1], "b c e -> b (c e)")[:, :, None, None].expand(-1, -1, h, m)
        at_bounds = rearrange(log_z.gather(1, idx), "b (c e) h m -> b c e h m", e=p + 1)
        lq = log_q[:, c0:c1, None]  # (B, C, 1, H, m)
        # The largest exponent any term of this query can reach (at its last bound): all terms <= 1.
        top = (lq[:, :, 0] + at_bounds[:, :, -1]).amax(-1)  # (B, C, H)
        top = top.masked_fill(~torch.isfinite(top), 0.0)
        cum = torch.exp(lq + at_bounds - top[:, :, None, :, None]).sum(-1)  # (B, C, P + 1, H)
        mass = (cum[:, :, 1:] - cum[:, :, :-1]).clamp_min(0.0)
        mass = mass / cum[:, :, -1:].clamp_min(torch.finfo(dtype).tiny)
        out[:, c0:c1] = rearrange(mass, "b c p h -> b c h p")
    return out


def empty_cells(geometry: KeyGeometry) -> torch.Tensor:
    """(B, T, 1, P) bool: cells that hold no key (all of them for a query that sees nothing)."""
    bounds = bin_bounds(geometry.visible, geometry.bins)
    return (bounds[..., 1:] == bounds[..., :-1])[:, :, None]


class MaskPredictor(nn.Module):
    """(Performer mass, q) -> logits of the estimated compressed attention, (B, T, H, P).

    logits = a_h log(mass) + MLP([log mass, q]) + CNN(that map), the CNN a residual 3 x 3 conv pair with
    the heads as channels over the (time x cell) image; causal in time for decoders (padding on the
    past side only), so row i reads rows <= i. The MLP's and the CNN's last layers start at zero: an
    untrained predictor is exactly the Performer estimate."""

    def __init__(self, heads: int, dim_head: int, bins: int, causal: bool):
        super().__init__()
        hidden = max(16, 2 * dim_head)
        self.causal = causal
        self.mlp = nn.Sequential(nn.Linear(bins + dim_head, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, bins))
        self.prior_scale = nn.Parameter(torch.ones(heads))
        self.conv_in = nn.Conv2d(heads, 4 * heads, 3)
        self.conv_out = nn.Conv2d(4 * heads, heads, 3)
        for layer in (self.mlp[-1], self.conv_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _pad(self, img: torch.Tensor) -> torch.Tensor:
        # (B, C, T, P): time padded on the past side only when causal; cells on both sides.
        return F.pad(img, (1, 1, 2, 0) if self.causal else (1, 1, 1, 1))

    def forward(self, mass: torch.Tensor, q: torch.Tensor, empty: torch.Tensor,
                query_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = ~empty  # (B, T, 1, P)
        if query_mask is not None:  # padded queries must not leak into their neighbours' rows
            keep = keep & query_mask.bool()[:, :, None, None]
        log_mass = torch.log(mass.clamp_min(1e-6)) * keep  # float32 at least (the Performer mass is)
        # Logits in the mass's precision whatever the weights' dtype: the MLP and the CNN run in their
        # weights' dtype (autocast's under autocast); their outputs join the float32 prior.
        wide = log_mass.dtype
        x = self.mlp(torch.cat([log_mass, q.to(wide)], -1).to(self.mlp[0].weight.dtype)).to(wide)
        x = x + self.prior_scale.to(wide)[:, None] * log_mass
        img = rearrange(x * keep, "b t h p -> b h t p").to(self.conv_in.weight.dtype)
        img = self.conv_out(self._pad(F.gelu(self.conv_in(self._pad(img)))))
        logits = x + rearrange(img, "b h t p -> b t h p").to(wide)
        return logits.masked_fill(empty, float("-inf"))


def sample_rows(t: int, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n distinct query rows in increasing order (all of them for n = 0 or n >= T)."""
    if n == 0 or n >= t:
        return torch.arange(t, device=device)
    return torch.randperm(t, generator=generator)[:n].sort().values.to(device)


@torch.no_grad()
def compressed_attention(q: torch.Tensor, k: torch.Tensor, geometry: KeyGeometry, key_mask: torch.Tensor | None,
                         rows: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense softmax attention of the query rows `rows` (n,), summed into their P cells: (B, n, H, P).

    The estimation target (the teacher's q, k, or the layer's own). Costs n x S, linear in T. Float32
    at least, autocast off on q's device."""
    with torch.autocast(q.device.type, enabled=False):
        return _compressed_attention(q, k, geometry, key_mask, rows, scale)


def _compressed_attention(q, k, geometry, key_mask, rows, scale):
    b, _, h, d = q.shape
    s, p = k.shape[1], geometry.bins
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    rank = rank_of_position(key_mask, b, s, q.device)[:, None, :]  # (B, 1, S)
    length = geometry.visible[:, rows, None]  # (B, n, 1)
    seen = (rank >= 0) & (rank < length)  # (B, n, S)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bnhd,bshd->bnhs", q[:, rows].to(dtype), k.to(dtype)) * scale
    probs = torch.softmax(scores.masked_fill(~seen[:, :, None], float("-inf")), -1).nan_to_num(0.0)
    cell = bin_of_rank(rank.clamp_min(0), length, p).clamp(0, p - 1)  # (B, n, S)
    target = torch.zeros(b, len(rows), h, p, dtype=dtype, device=q.device)
    return target.scatter_add_(3, cell[:, :, None].expand(-1, -1, h, -1), probs)


def estimation_losses(logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor,
                      visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(target || estimate) summed over cells and MSE(estimate, target) averaged over cells, both
    averaged over the sampled rows (B, n, H) that see at least one key. logits: (B, T, H, P)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_est = torch.log_softmax(logits[:, rows].to(dtype), -1)  # (B, n, H, P), -inf at empty cells
    valid = (visible[:, rows] > 0)[:, :, None].expand(-1, -1, logits.shape[2]).to(dtype)  # (B, n, H)
    log_est = log_est.masked_fill(~torch.isfinite(log_est), 0.0)  # the target is 0 there too
    kl_cells = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_est), 0.0)
    est = torch.exp(log_est) * (logits[:, rows] > float("-inf"))
    count = valid.sum().clamp_min(1.0)
    kl = (kl_cells.sum(-1) * valid).sum() / count
    mse = (((est - target) ** 2).mean(-1) * valid).sum() / count
    return kl, mse
