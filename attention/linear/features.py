"""Feature maps phi for linear attention: elu + 1, relu, and Performer's FAVOR+ positive random features.

Public API (SEA reuses the Performer part):

    elu_features(x), relu_features(x)                      elementwise, any shape
    orthogonal_random_projection(nb_features, dim_head)    (m, D) FAVOR+ projection
    performer_log_features(x, projection)                  log phi(x) before stabilising, (..., m)
    performer_features(x, projection, is_query)            phi(x), (B, T, H, m), Performer's stabilisers
    PerformerFeatures(dim_head, nb_features, redraw_interval)
        .forward(x, is_query, key_mask=None), .redraw(), .advance()  (call once per training step)
    featurize_qk(q, k, feature_map, projection)            what linear_attention applies inside

FAVOR+ (Choromanski et al. 2021): with x' = x / D^(1/4) and rows w_i of the projection,
    phi(x)_i = exp(w_i . x' - |x'|^2 / 2) / sqrt(m),   E[phi(q) . phi(k)] = exp(q . k / sqrt(D)),
the softmax kernel. The rows are orthogonal in blocks of D (lower variance than i.i.d.) and scaled by
chi-distributed norms so each row is marginally N(0, I).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attention.config import ConfigError

# Names linear_attention accepts; "identity" means q and k already are non-negative features.
FEATURE_MAPS = ("elu", "relu", "performer", "identity")


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """Katharopoulos et al.: elu(x) + 1 > 0, so every normaliser is positive."""
    return F.elu(x) + 1.0


def relu_features(x: torch.Tensor) -> torch.Tensor:
    """relu(x) >= 0; a query whose features meet no key's gets a zero normaliser (output 0)."""
    return F.relu(x)


def default_nb_features(dim_head: int) -> int:
    """Performer's default m = D ln D (at least 1)."""
    return max(1, round(dim_head * math.log(dim_head)))


def orthogonal_random_projection(nb_features: int, dim_head: int, *,
                                 generator: torch.Generator | None = None,
                                 device: torch.device | str | None = None,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(nb_features, dim_head): blocks of D orthonormal rows, each row scaled by the norm of a
    D-dimensional Gaussian, so rows are marginally N(0, I) but orthogonal within a block.

    Drawn on the CPU (deterministic for a seeded generator on every device), then moved."""
    blocks = []
    for _ in range(math.ceil(nb_features / dim_head)):
        gaussian = torch.randn(dim_head, dim_head, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # Sign fix makes Q Haar-distributed (QR alone biases the signs), so each row is uniform on
        # the sphere, which the unbiasedness of the estimator needs.
        q = q * torch.sign(torch.diagonal(r))[None, :]
        blocks.append(q.T)
    directions = torch.cat(blocks)[:nb_features]  # (m, D)
    norms = torch.randn(nb_features, dim_head, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * norms[:, None]).to(device=device, dtype=dtype)


def performer_log_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """log phi(x): (..., D) -> (..., m), w . x' - |x'|^2 / 2 - log(sqrt m), x' = x / D^(1/4)."""
    dim, m = x.shape[-1], projection.shape[0]
    x = x * dim ** -0.25
    proj = torch.einsum("...d,md->...m", x, projection.to(x.dtype))
    return proj - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(m)


def performer_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool,
                       key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x) for x: (B, T, H, D) -> (B, T, H, m), positive.

    Stabilisers (detached constants that cancel in attention's normalisation): a query subtracts its
    own max log-feature; keys subtract the max over the sequence and features per (batch, head),
    over real keys only when key_mask (B, T) is given. The key stabiliser looks at every key, so for
    causal attention it lets later keys change earlier outputs by rounding; linear_attention uses a
    causal running stabiliser instead (featurize_qk)."""
    log_phi = performer_log_features(x, projection)
    if is_query:
        return torch.exp(log_phi - log_phi.amax(-1, keepdim=True).detach())
    row_max = log_phi.amax(-1).detach()  # (B, T, H)
    if key_mask is not None:
        row_max = row_max.masked_fill(~key_mask.bool()[:, :, None], float("-inf"))
    stabiliser = row_max.amax(1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)  # (B, 1, H)
    return torch.exp(log_phi - stabiliser[..., None])


def featurize_qk(q: torch.Tensor, k: torch.Tensor, feature_map: str,
                 projection: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(phi_q, phi_k, key_log_weight) for q, k: (B, T, H, D), as linear_attention uses them.

    Keys are returned as phi(k) = phi_k * exp(key_log_weight[..., None]): for Performer, phi_k is
    stabilised per key (max feature = 1) and key_log_weight (B, T, H) carries the key's own log
    scale, so the ops can rescale by a running max over the keys a query sees (causal, O(1) state)
    instead of a max over the whole sequence. For elu / relu / identity key_log_weight is None."""
    if feature_map not in FEATURE_MAPS:
        raise ConfigError(f"feature_map: got {feature_map!r}, allowed: {', '.join(FEATURE_MAPS)}")
    if feature_map == "performer":
        if projection is None:
            raise ValueError("feature_map='performer' needs projection=(nb_features, dim_head)")
        if projection.shape[-1] != q.shape[-1]:
            raise ValueError(f"projection: width {projection.shape[-1]} != dim_head {q.shape[-1]}")
        phi_q = performer_features(q, projection, is_query=True)
        log_phi_k = performer_log_features(k, projection)
        key_log_weight = log_phi_k.amax(-1).detach()  # (B, T, H)
        return phi_q, torch.exp(log_phi_k - key_log_weight[..., None]), key_log_weight
    if feature_map == "elu":
        return elu_features(q), elu_features(k), None
    if feature_map == "relu":
        return relu_features(q), relu_features(k), None
    return q, k, None


class PerformerFeatures(nn.Module):
    """FAVOR+ features with the projection as a buffer (saved in checkpoints).

    redraw_interval: draw a fresh projection every N training steps (0 = never). The mixer calls
    advance() once per training forward; the projection in use has then served exactly N steps.
    Draws come from a generator seeded by (seed buffer, number of draws), so every data-parallel
    worker that starts from the same checkpoint or broadcast draws the same projection."""

    def __init__(self, dim_head: int, nb_features: int = 0, redraw_interval: int = 0,
                 seed: int | None = None):
        super().__init__()
        if dim_head < 1 or nb_features < 0 or redraw_interval < 0:
            raise ValueError(f"PerformerFeatures: dim_head={dim_head} (>= 1), nb_features={nb_features} "
                             f"(>= 0), redraw_interval={redraw_interval} (>= 0)")
        self.dim_head = dim_head
        self.nb_features = nb_features or default_nb_features(dim_head)
        self.redraw_interval = redraw_interval
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self.register_buffer("steps_since_redraw", torch.zeros((), dtype=torch.int64))
        self.register_buffer("projection", self._draw())

    def _draw(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(self.seed) + int(self.draws))
        return orthogonal_random_projection(self.nb_features, self.dim_head, generator=generator)

    @torch.no_grad()
    def redraw(self) -> None:
        """A fresh projection now (the next seed in this module's sequence)."""
        self.draws += 1
        self.projection.copy_(self._draw())
        self.steps_since_redraw.zero_()

    @torch.no_grad()
    def advance(self) -> None:
        """Count one training step; redraw first when the current projection has served its interval."""
        if self.redraw_interval == 0:
            return
        if int(self.steps_since_redraw) >= self.redraw_interval:
            self.redraw()
        self.steps_since_redraw += 1

    def forward(self, x: torch.Tensor, is_query: bool, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return performer_features(x, self.projection, is_query, key_mask)

    def extra_repr(self) -> str:
        return f"dim_head={self.dim_head}, nb_features={self.nb_features}, redraw={self.redraw_interval}"
