"""The causal CoLT5 modules computed window by window, in plain PyTorch: the ground truth of the batched
paths (autoregressive.py, feedforward.py, causal_router.py and its Triton kernels), written from the
definitions in causal_router.py and readable as such. Quadratic in time and one host loop per window:
tests only.

For window n of heavy_window = w tokens (positions [n w, (n + 1) w)):
  queries / ff tokens  y_i = exp(min(s_i + a_{n-1}, 0) / eps), a_{n-1} the dual of window n - 1 (budget
                       min(candidates, C)), a learned threshold for n = 0; the first C tokens with
                       y_i >= 1/2, in position order, are routed with gate straight_through(y_i)
  key/values           the top-K scores among candidates at positions < n w; gate
                       straight_through(exp(min(s_j + a, 0) / eps)), a the (constant) dual of that
                       prefix with budget min(candidates, K * 9/8)
  attention            routed queries of window n attend to its K key/values and the null key/value
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.colt5.router import FETCH_K_RATIO, routing_dtype, straight_through
from attention.coor_descent.reference import coor_descent_dual
from attention.layers import zero_padded


def _valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()


def _router_args(router) -> tuple:
    return router.n_iters, router.eps, router.eps_init, router.eps_decay


def window_router_reference(router, x: torch.Tensor, capacity: int, mask: torch.Tensor | None = None):
    """CausalWindowRouter window by window -> [(positions (B, C) with T for an empty slot, gates (B, C),
    routed (B, C) bool) for each window]."""
    b, t, _ = x.shape
    w, dtype = router.window, routing_dtype(x)
    capacity = min(capacity, w)
    s_all = (x.to(dtype) @ router.routing_token[0].to(dtype)) * router.scale  # (B, T)
    valid_all = _valid(x, mask)
    a_prev = router.first_threshold.to(dtype).expand(b, 1)
    eps_final = _router_args(router)[1]
    out = []
    for start in range(0, t, w):
        # the window padded to w entries with non-candidates, as the batched path pads the last one
        s = F.pad(s_all[:, start:start + w], (0, w - min(w, t - start)))
        valid = F.pad(valid_all[:, start:start + w], (0, w - min(w, t - start)), value=False)
        a, eps_final = coor_descent_dual(s, valid.sum(-1, keepdim=True).clamp(max=capacity).to(dtype)[:, 0],
                                         *_router_args(router), valid)
        y = torch.exp(torch.clamp(s + a_prev, max=0.0) / eps_final) * valid  # (B, w)
        positions, gates, routed = [], [], []
        for i in range(b):
            chosen = (y[i] >= 0.5).nonzero()[:capacity, 0]  # candidates in position order
            slots = capacity - len(chosen)
            positions.append(F.pad(chosen + start, (0, slots), value=t))
            gates.append(F.pad(straight_through(y[i, chosen]), (0, slots)))
            routed.append(torch.arange(capacity, device=x.device) < len(chosen))
        out.append((torch.stack(positions), torch.stack(gates), torch.stack(routed)))
        a_prev = a
    return out


def prefix_router_reference(router, x: torch.Tensor, k: int, mask: torch.Tensor | None, n: int):
    """CausalPrefixRouter for window n alone -> (positions (B, R, K) with T for an empty slot, gates, ok)."""
    b, t, _ = x.shape
    k, dtype = min(k, t), routing_dtype(x)
    s = torch.einsum("btd,rd->brt", x.to(dtype), router.routing_tokens.to(dtype)) * router.scale  # (B, R, T)
    visible = _valid(x, mask)[:, None, :] & (torch.arange(t, device=x.device) < n * router.window)
    visible = visible.expand_as(s)
    top = s.detach().masked_fill(~visible, float("-inf")).topk(k, dim=-1)
    ok = visible.gather(-1, top.indices)
    budget = visible.sum(-1).clamp(max=k * FETCH_K_RATIO).to(dtype)
    a, eps_final = coor_descent_dual(s.detach(), budget, *_router_args(router), visible)
    gates = straight_through(torch.exp(torch.clamp(s.gather(-1, top.indices) + a, max=0.0) / eps_final)) * ok
    return top.indices.masked_fill(~ok, t), gates, ok


def autoregressive_reference(layer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RoutedAutoregressiveAttention(x) window by window, with layer's parameters."""
    b, t, dim = x.shape
    cfg, attn = layer.cfg, layer.attn
    heavy = [layer.null_q_out.to(x.dtype).expand(b, dim)] * t  # row i: null_q_out unless routed
    batch = torch.arange(b, device=x.device)
    windows = window_router_reference(layer.q_router, x, cfg.window_routed_q, mask)
    for n, (q_pos, q_gates, q_routed) in enumerate(windows):
        kv_pos, kv_gates, kv_ok = prefix_router_reference(layer.kv_router, x, cfg.num_routed_kv, mask, n)
        kv = attn.project_kv(x[batch[:, None, None], kv_pos.clamp(max=t - 1)])  # (B, R, K, E)
        out = attn.attend(x[batch[:, None], q_pos.clamp(max=t - 1)], kv, kv_gates, kv_ok)  # (B, C, dim)
        out = out * q_gates[..., None].to(out.dtype)
        for i in range(b):
            for slot in range(q_pos.shape[1]):
                if q_routed[i, slot]:
                    p = int(q_pos[i, slot])
                    heavy[p] = torch.cat([heavy[p][:i], out[i, slot][None], heavy[p][i + 1:]])
    return zero_padded(layer.light(x, mask=mask) + torch.stack(heavy, 1), mask)


def causal_feedforward_reference(ff, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """CausalRoutedFeedForward(x) window by window, with ff's parameters."""
    b, t, dim = x.shape
    rows = [[x.new_zeros(dim) for _ in range(t)] for _ in range(b)]
    for pos, gates, routed in window_router_reference(ff.router, x, ff.cfg.window_routed_ff, mask):
        for i in range(b):
            for slot in range(pos.shape[1]):
                if routed[i, slot]:
                    p = int(pos[i, slot])
                    rows[i][p] = ff.heavy(x[i, p]) * gates[i, slot].to(x.dtype)
    heavy = torch.stack([torch.stack(r) for r in rows])
    return zero_padded(ff.light(x) + heavy, mask)
