from __future__ import annotations

import torch

from attention.coor_descent.config import CoorDescentConfig
from attention.coor_descent.ops import coor_descent, coor_descent_attention, unconverged_fraction
from attention.coor_descent.reference import visible_keys
from attention.layers import MultiheadMixer

CONVERGENCE_ROWS = 64  # query rows re-solved each forward to report convergence (cheap: rows x S)
CONVERGENCE_TOL = 0.05  # relative: a row missing its budget by more than 5% counts as unconverged


class CoorDescentAttention(MultiheadMixer):
    """Multi-head coordinate-descent attention: self or cross (context), causal or not, key padding mask.

    aux: coor_descent_unconverged, the fraction of a sample of query rows (first sample, first head)
    whose weights miss their budget, so a setting that does not converge shows up in the run's metrics."""

    def __init__(self, cfg: CoorDescentConfig, dim: int):
        super().__init__(cfg, dim)
        self.aux: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _convergence(self, q, k, causal, key_mask) -> torch.Tensor:
        cfg = self.cfg
        t, s = q.shape[1], k.shape[1]
        rows = torch.linspace(0, t - 1, min(t, CONVERGENCE_ROWS), device=q.device).long()
        scores = torch.einsum("td,sd->ts", q[0, rows, 0].float(), k[0, :, 0].float()) * q.shape[-1] ** -0.5
        allowed = visible_keys(t, s, causal, None if key_mask is None else key_mask[:1], q.device)[0, 0, rows]
        budget = allowed.sum(-1).clamp(max=cfg.k).float()
        # the fused rows kernel on CUDA: the reference's 50 iterations are ~500 small launches per forward,
        # which dominated the block's time at short T (issue 20)
        y = coor_descent(scores, budget, cfg.n_iters, cfg.eps, cfg.eps_init, cfg.eps_decay, allowed, cfg.backend)
        return unconverged_fraction(y, budget, CONVERGENCE_TOL * budget.clamp(min=1), allowed)

    def attend(self, q, k, v, *, causal, key_mask):
        cfg = self.cfg
        y = coor_descent_attention(q, k, v, topk=cfg.k, n_iters=cfg.n_iters, eps=cfg.eps,
                                   eps_init=cfg.eps_init, eps_decay=cfg.eps_decay, causal=causal,
                                   key_mask=key_mask, backend=cfg.backend)
        self.aux = {"coor_descent_unconverged": self._convergence(q, k, causal, key_mask)}
        return y.to(q.dtype)
