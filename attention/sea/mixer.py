from __future__ import annotations

import torch
from torch import nn

from attention.layers import QKVProjection, merge_heads, zero_padded
from attention.linear.features import default_nb_features, orthogonal_random_projection
from attention.sea.config import SeaConfig
from attention.sea.estimator import (
    MaskPredictor,
    compressed_attention,
    empty_cells,
    estimation_losses,
    performer_bin_mass,
    sample_rows,
)
from attention.sea.geometry import key_geometry
from attention.sea.mask import mask_density, select_cells
from attention.sea.sparse import sparse_attention


class _AddLossGradient(torch.autograd.Function):
    """Identity on y; in backward, also starts the gradient of `loss` (as if it were added to the
    objective). The estimator only learns from its own loss (top-k passes no gradient), so any workload
    that trains on y trains the estimator too, without knowing about it."""

    @staticmethod
    def forward(ctx, y, loss):
        ctx.save_for_backward(loss)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class SeaAttention(nn.Module):
    """Multi-head SEA self-attention, causal or not, with a key padding mask.

    Set `distill_target = (q, k)` (B, T, H, D) of a teacher layer before a training forward to train
    the estimator on the teacher's attention instead of this layer's own (it is read once, then
    cleared). Set `capture = True` to keep the last forward's q, k, estimate and mask in `captured`.
    aux: mask_density (fraction of visible keys attended), est_kl and est_mse (training only)."""

    def __init__(self, cfg: SeaConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.heads, self.dim_head = cfg.inner_dim(dim)
        self.qkv = QKVProjection(dim, self.heads, self.dim_head)
        self.to_out = nn.Linear(self.heads * self.dim_head, dim)
        self.drop = nn.Dropout(cfg.dropout)
        nb_features = cfg.nb_features or default_nb_features(self.dim_head)
        # A fixed draw (a buffer, saved in checkpoints): the predictor learns to read these features.
        self.register_buffer("projection", orthogonal_random_projection(nb_features, self.dim_head))
        self.predictor = MaskPredictor(self.heads, self.dim_head, cfg.predictor_length, cfg.causal)
        self.distill_target: tuple[torch.Tensor, torch.Tensor] | None = None
        self.capture = False
        self.captured: dict | None = None
        self.aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
        if context is not None:
            raise ValueError("sea: cross attention (context=...) is not supported; use it for self-attention")
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.qkv(x)  # (B, T, H, D)
        geometry = key_geometry(b, t, t, cfg.causal, mask, cfg.predictor_length, x.device)
        # The estimator reads q, k without sending gradient into them: it is trained by its own loss
        # only, and the attention projections by the task through the sparse attention.
        mass = performer_bin_mass(q.detach(), k.detach(), geometry, self.projection)  # (B, T, H, P)
        logits = self.predictor(mass, q.detach(), empty_cells(geometry), mask)
        est = torch.softmax(logits.float(), -1).nan_to_num(0.0)
        sparse_mask = select_cells(est, geometry, cfg.k, cfg.topk_group)
        y = sparse_attention(q, k, v, sparse_mask, geometry, backend=cfg.backend)  # (B, T, H, D)
        aux = {"mask_density": mask_density(sparse_mask, geometry, self.heads).detach()}
        target, self.distill_target = self.distill_target, None
        if self.training and torch.is_grad_enabled() and cfg.estimator_loss_weight > 0:
            tq, tk = target if target is not None else (q.detach(), k.detach())
            rows = sample_rows(t, cfg.loss_rows, x.device)
            wanted = compressed_attention(tq, tk, geometry, mask, rows)
            kl, mse = estimation_losses(logits, wanted, rows, geometry.visible)
            y = _AddLossGradient.apply(y, cfg.estimator_loss_weight * (0.1 * kl + mse))
            aux.update(est_kl=kl.detach(), est_mse=mse.detach())
        self.aux = aux
        if self.capture:
            self.captured = {"q": q.detach(), "k": k.detach(), "est": est.detach(), "mask": sparse_mask,
                             "geometry": geometry}
        return zero_padded(self.drop(self.to_out(merge_heads(y))), mask)
