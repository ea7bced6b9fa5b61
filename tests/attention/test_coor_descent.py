"""Coordinate descent: reference vs independent float64 implementations, gradients, convergence, top-k,
coordinate-descent attention and the `coor_descent` method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import attention
from attention.config import ConfigError
from attention.coor_descent import (
    convergence,
    coor_descent,
    coor_descent_attention,
    coor_descent_attention_reference,
    coor_descent_dual,
    coor_descent_reference,
    topk,
)
from attention.coor_descent.ops import unconverged_fraction
from attention.models import DecoderLM, Encoder

# The original colt5-attention router defaults (DESIGN.md: they leave rows far below k).
ORIGINAL_DEFAULTS = {"n_iters": 20, "eps": 0.03, "eps_init": 4.0, "eps_decay": 0.7}


def cd_numpy(s, k, n_iters, eps, eps_init=None, eps_decay=1.0, mask=None):
    """Independent row-by-row implementation: masked entries are dropped, not filled."""
    s = np.asarray(s, dtype=np.float64)
    out = np.zeros_like(s)
    rows = s.reshape(-1, s.shape[-1])
    masks = np.ones_like(rows, dtype=bool) if mask is None else np.asarray(mask).reshape(rows.shape)
    ks = np.broadcast_to(np.asarray(k, dtype=np.float64), s.shape[:-1]).reshape(-1)
    flat = out.reshape(rows.shape)
    for r in range(rows.shape[0]):
        idx = np.flatnonzero(masks[r])
        if idx.size == 0:
            continue
        x, e = rows[r, idx], max(eps_init or eps, eps)
        a, b = 0.0, -x
        for _ in range(n_iters):
            a = e * (math.log(ks[r]) - logsumexp((x + b) / e))
            b = -np.maximum(x + a, 0.0)
            e = max(e * eps_decay, eps)
        flat[r, idx] = np.exp((x + a + b) / e)
    return out


def exact_soft_topk(s: np.ndarray, k: float, eps: float) -> np.ndarray:
    """The optimum of <s, y> + eps H(y), sum y = k, 0 <= y <= 1 (KKT: y = min(1, exp((s + a) / eps))),
    with a found by bisection: what coordinate descent converges to."""
    lo, hi = -s.max() - 50 * eps, -s.min() + 50 * eps
    for _ in range(200):
        a = (lo + hi) / 2
        total = np.minimum(1.0, np.exp((s + a) / eps)).sum()
        lo, hi = (a, hi) if total < k else (lo, a)
    return np.minimum(1.0, np.exp((s + (lo + hi) / 2) / eps))


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("n_iters,eps,eps_init,eps_decay", [(7, 0.2, None, 1.0), (30, 0.05, 2.0, 0.8),
                                                             (3, 1.0, 0.5, 0.5)])
def test_reference_matches_independent_float64(n_iters, eps, eps_init, eps_decay):
    s = randn(3, 5, 63, seed=1)
    mask = randn(3, 5, 63, seed=2) > -0.8
    mask[0, 0] = False  # a fully masked row
    mask[1, 2, 1:] = False  # a single candidate
    k_rows = torch.randint(1, 9, (3, 5), generator=torch.Generator().manual_seed(3)).double()
    for k in (4.0, k_rows):
        got = coor_descent_reference(s, k, n_iters, eps, eps_init, eps_decay, mask)
        want = cd_numpy(s.numpy(), k.numpy() if torch.is_tensor(k) else k, n_iters, eps, eps_init, eps_decay,
                        mask.numpy())
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
        assert torch.all(got[~mask] == 0) and torch.all(got[0, 0] == 0)
    unmasked = coor_descent_reference(s, 4.0, n_iters, eps, eps_init, eps_decay)
    np.testing.assert_allclose(unmasked.numpy(), cd_numpy(s.numpy(), 4.0, n_iters, eps, eps_init, eps_decay),
                               rtol=1e-10, atol=1e-12)


def test_converged_output_is_the_exact_soft_topk_and_sums_to_k():
    s = randn(4, 101, seed=4)
    for k in (1.0, 10.0, 37.5):
        y = coor_descent_reference(s, k, 300, 0.1, 1.0, 0.9)
        for row in range(4):
            np.testing.assert_allclose(y[row].numpy(), exact_soft_topk(s[row].numpy(), k, 0.1), atol=1e-6)
        torch.testing.assert_close(y.sum(-1), torch.full((4,), k, dtype=torch.float64), rtol=1e-6, atol=0)
        assert convergence(y, k, tol=1e-3)["unconverged"] == 0


def test_dual_reproduces_the_output():
    s, mask = randn(6, 40, seed=5), randn(6, 40, seed=6) > -1
    mask[2] = False
    a, eps_final = coor_descent_dual(s, 5.0, 12, 0.1, 1.0, 0.8, mask)
    rebuilt = torch.exp(torch.clamp(s + a, max=0) / eps_final) * mask
    torch.testing.assert_close(rebuilt, coor_descent_reference(s, 5.0, 12, 0.1, 1.0, 0.8, mask),
                               rtol=1e-12, atol=1e-12)


def test_gradcheck_with_mask_and_per_row_k():
    s = randn(3, 9, seed=7).requires_grad_()
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, ::3] = False
    mask[2] = False  # fully masked: zeros and zero gradient, no NaN
    k = torch.tensor([2.0, 3.5, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: coor_descent_reference(x, k, 6, 0.3, 1.0, 0.8, mask), (s,))
    y = coor_descent_reference(s, k, 6, 0.3, 1.0, 0.8, mask)
    y.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[2] == 0) and torch.all(y[2] == 0)


def test_fully_masked_rows_are_zero_in_low_precision_too():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = randn(2, 17, dtype=dtype).requires_grad_()
        mask = torch.zeros(2, 17, dtype=torch.bool)
        mask[1, :4] = True
        y = coor_descent(s, 2.0, 10, 0.1, mask=mask)
        y.float().sum().backward()
        assert torch.all(y[0] == 0) and torch.isfinite(y).all() and torch.isfinite(s.grad).all()


def test_original_defaults_do_not_converge_and_ours_do():
    """Regression (DESIGN.md peers): colt5-attention's router defaults leave rows well below k. The
    convergence stats must report it, and the defaults shipped here must converge."""
    s = randn(32, 1024, seed=8, dtype=torch.float32)  # router scores are ~N(0, 1) here (router.py)
    k = 72.0
    stats = convergence(coor_descent(s, k, **ORIGINAL_DEFAULTS), k, tol=0.05 * k)
    assert stats["unconverged_frac"] == 1.0 and stats["rows"] == 32
    ours = attention.make_config("colt5")
    y = coor_descent(s, k, ours.router_iters, ours.router_eps, ours.router_eps_init, ours.router_eps_decay)
    assert convergence(y, k, tol=0.01 * k)["unconverged"] == 0
    cd = attention.make_config("coor_descent")
    y = coor_descent(s, k, cd.n_iters, cd.eps, cd.eps_init, cd.eps_decay)
    assert convergence(y, k, tol=0.01 * k)["unconverged"] == 0


def test_convergence_counts_rows_and_skips_empty_ones():
    y = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.2, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [False, False, False]])
    stats = convergence(y, torch.tensor([2.0, 2.0, 2.0]), tol=0.1, mask=mask)
    assert stats["rows"] == 2 and stats["unconverged"] == 1
    assert stats["unconverged_frac"] == 0.5 and stats["max_gap"] == pytest.approx(1.3)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_unconverged_fraction_equals_convergence_stats(masked, per_row):
    y = torch.rand(3, 5, 40, generator=torch.Generator().manual_seed(4))
    mask = torch.rand(3, 5, 40, generator=torch.Generator().manual_seed(5)) > 0.3 if masked else None
    if masked:
        mask[0, 1] = False  # a row with no candidate is not counted
    k = 19 + 2 * torch.rand(3, 5, generator=torch.Generator().manual_seed(6)) if per_row else 20.0  # sums ~20
    tol = 0.05 * (k.clamp(min=1) if per_row else k)
    expected = convergence(y, k, tol, mask)["unconverged_frac"]
    assert 0 < float(expected) < 1  # a mix of converged and unconverged rows: the comparison means something
    torch.testing.assert_close(unconverged_fraction(y, k, tol, mask), expected)


def test_topk_indices_values_and_gradients():
    x = randn(4, 50, seed=9).requires_grad_()
    out = topk(x, 6, eps=0.5)
    assert torch.equal(out.indices.sort(-1).values, x.topk(6).indices.sort(-1).values)
    torch.testing.assert_close(out.values, x.gather(-1, out.indices))
    torch.testing.assert_close(out.gates, torch.ones_like(out.gates))  # straight-through: 1 forward
    (out.values * out.gates).sum().backward()
    assert x.grad.abs().sum() > 0 and torch.all(x.grad.count_nonzero(-1) > 6)  # soft gates reach others
    mask = torch.zeros(4, 50, dtype=torch.bool)
    mask[:, :3] = True
    masked = topk(x.detach(), 6, mask=mask)
    assert torch.all(masked.gates.sum(-1) == 3)  # 3 candidates: the other 3 selected get gate 0
    with pytest.raises(ValueError, match="k: must be in"):
        topk(x, 51)


def test_backend_choice():
    s = randn(2, 10, dtype=torch.float32)
    torch.testing.assert_close(coor_descent(s, 2.0, 5, 0.1, backend="reference"),
                               coor_descent(s, 2.0, 5, 0.1, backend="auto"))
    with pytest.raises(ConfigError, match="backend"):
        coor_descent(s, 2.0, 5, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="eps_decay"):
        coor_descent(s, 2.0, 5, 0.1, eps_decay=1.5)


# ---- coordinate-descent attention -------------------------------------------------------------------

def attention_loop(q, k, v, topk, n_iters, eps, eps_init, eps_decay, causal, key_mask, scale):
    """Independent per-query loop in float64 over the visible keys only."""
    b, t, h, d = q.shape
    s_len = k.shape[1]
    out = np.zeros((b, t, h, d))
    qn, kn, vn = (x.detach().numpy() for x in (q, k, v))
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                vis = [j for j in range(s_len) if (not causal or j <= i + s_len - t)
                       and (key_mask is None or key_mask[bi, j])]
                if not vis:
                    continue
                s = kn[bi, vis, hi] @ qn[bi, i, hi] * scale
                y = cd_numpy(s, min(topk, len(vis)), n_iters, eps, eps_init, eps_decay)
                out[bi, i, hi] = y @ vn[bi, vis, hi] / max(y.sum(), 1e-6)
    return out


@pytest.mark.parametrize("causal,t,s", [(False, 13, 21), (True, 13, 21), (True, 17, 17)])
def test_attention_reference_matches_loop(causal, t, s):
    q, k, v = randn(2, t, 2, 6, seed=10), randn(2, s, 2, 6, seed=11), randn(2, s, 2, 6, seed=12)
    key_mask = randn(2, s, seed=13) > -0.5
    key_mask[1, :] = False  # every query of sample 1 sees no key: zeros
    got = coor_descent_attention_reference(q, k, v, topk=4, n_iters=8, eps=0.2, eps_init=1.0,
                                           eps_decay=0.8, causal=causal, key_mask=key_mask, scale=0.3)
    want = attention_loop(q, k, v, 4, 8, 0.2, 1.0, 0.8, causal, key_mask.numpy(), 0.3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    assert torch.all(got[1] == 0)


def test_attention_with_budget_equal_to_visible_keys_is_the_mean_of_values():
    q, k, v = randn(1, 9, 1, 4, seed=14), randn(1, 9, 1, 4, seed=15), randn(1, 9, 1, 4, seed=16)
    # k = n is the slowest case to converge (README: failure modes): 300 iterations at eps 0.1.
    out = coor_descent_attention(q, k, v, topk=9, n_iters=300, eps=0.1, causal=True)
    means = torch.cumsum(v, 1) / torch.arange(1, 10, dtype=torch.float64).view(1, 9, 1, 1)
    torch.testing.assert_close(out, means, rtol=1e-6, atol=1e-6)


def test_attention_gradcheck():
    q, k, v = (randn(1, 5, 1, 3, seed=i).requires_grad_() for i in (17, 18, 19))
    fn = lambda q, k, v: coor_descent_attention_reference(  # noqa: E731
        q, k, v, topk=2, n_iters=5, eps=0.5, eps_init=1.0, eps_decay=0.8, causal=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---- the registered method ---------------------------------------------------------------------------

def test_method_registered_and_config_errors():
    assert "coor_descent" in attention.methods()
    cfg = attention.make_config("coor_descent", k=8)
    with pytest.raises(ConfigError, match="coor_descent.k: got 80"):
        Encoder(attention.make_config("coor_descent", k=80), dim=16, depth=1, max_len=63)
    with pytest.raises(ConfigError, match="coor_descent.eps_decay"):
        attention.make_config("coor_descent", eps_decay=0.0)
    with pytest.raises(ConfigError, match="unknown field"):  # keys per query is `k`, as for topk and sea
        attention.make_config("coor_descent", sparsity_k=3)
    assert cfg.to_dict()["k"] == 8


def test_mixer_causal_padding_and_aux():
    torch.manual_seed(0)
    cfg = attention.make_config("coor_descent", k=5, heads=2, n_iters=20, causal=True)
    mixer = attention.build(cfg, 24).double()
    x = randn(2, 31, 24, seed=20)
    mask = torch.ones(2, 31, dtype=torch.bool)
    mask[1, 25:] = False
    y = mixer(x, mask=mask)
    assert y.shape == x.shape and torch.all(y[1, 25:] == 0)
    assert 0 <= float(mixer.aux["coor_descent_unconverged"]) <= 1
    x2 = x.clone()
    x2[:, 20] += 1.0  # a change at position 20 must not reach earlier positions
    y2 = mixer(x2, mask=mask)
    torch.testing.assert_close(y2[:, :20], y[:, :20], rtol=0, atol=0)
    assert (y2[0, 20:] - y[0, 20:]).abs().max() > 1e-3
    context = randn(2, 11, 24, seed=21)
    assert mixer(x, context=context).shape == x.shape  # cross attention


def test_decoder_trains_one_step():
    torch.manual_seed(0)
    model = DecoderLM(attention.make_config("coor_descent", k=4, heads=2, n_iters=10), vocab=30,
                      dim=16, depth=1, max_len=20)
    tokens = torch.randint(0, 30, (2, 20))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
