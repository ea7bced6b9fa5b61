"""The causal CoLT5 routers' Triton kernels (attention/colt5/router_kernel.py) on the CPU under
TRITON_INTERPRET=1, against the PyTorch path in float64: the window duals (value, exact unrolled
gradient, own-fit sums), the prefix top-K and duals (odd sizes, padding, K above the window and above
the prefix, fully padded windows), and the whole autoregressive attention and feed-forward on the kernels
against the per-window reference (outputs and every gradient). Kernel outputs start as NaN."""

from __future__ import annotations

import pytest
import torch  # (imports no triton)

# before anything imports triton: it sets TRITON_INTERPRET (poisoned_outputs is an autouse fixture)
from tests.attention.triton_interpreter import TOL, poisoned_outputs, rel, skip_unless_interpreted  # noqa: F401

triton = pytest.importorskip("triton")

import attention  # noqa: E402
from attention.colt5 import CausalRoutedFeedForward, RoutedAutoregressiveAttention, router_kernel  # noqa: E402
from attention.colt5.causal_router import CausalPrefixRouter  # noqa: E402
from attention.colt5.reference import autoregressive_reference, causal_feedforward_reference  # noqa: E402
from attention.coor_descent.reference import coor_descent_dual  # noqa: E402

skip_unless_interpreted(router_kernel._window_dual_fwd)

ITERS = (20, 0.1, 1.0, 0.85)  # n_iters, eps, eps_init, eps_decay: eps decays to its floor on the way


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("w", [13, 128, 300])  # one partial block, one whole block, several blocks
def test_window_duals_value_gradient_and_own_fit(w):
    b, n = 2, 5
    s = torch.randn(b, n, w, generator=gen(w), dtype=torch.float64) * 1.5
    valid = torch.rand(b, n, w, generator=gen(w + 1)) > 0.2
    valid[1, 2] = False  # a window with no candidate
    budget = valid.sum(-1).clamp(max=4).double()
    s64 = s.clone().requires_grad_()
    a_ref, eps_ref = coor_descent_dual(s64, budget, *ITERS, valid)
    grad = torch.randn(b, n, 1, generator=gen(3), dtype=torch.float64)
    (a_ref * grad).sum().backward()
    s32 = s.float().requires_grad_()
    a, eps_final, own = router_kernel.window_dual_triton(s32, valid, budget.float(), *ITERS)
    (a * grad.float()).sum().backward()
    seen = valid.any(-1)
    assert eps_final == eps_ref
    assert rel(a[seen], a_ref[seen]) < TOL[torch.float32][0]
    assert a[1, 2] > 1e30  # no candidate: the reference's masked fill makes the threshold huge too
    assert rel(s32.grad, s64.grad) < TOL[torch.float32][1]
    assert torch.all(s32.grad[~valid] == 0)
    fit = (torch.exp(torch.clamp(s + a_ref, max=0) / eps_ref) * valid).sum(-1)
    assert rel(own[seen], fit[seen]) < TOL[torch.float32][0]


@pytest.mark.parametrize("t, w, k", [(70, 8, 11), (61, 16, 40), (33, 16, 2)])
def test_prefix_selection_and_duals_match_the_pytorch_path(t, w, k):
    b, r = 2, 2
    s = torch.randn(b, r, t, generator=gen(t))
    valid = torch.rand(b, t, generator=gen(t + 1)) > 0.25
    valid[0, : w + 3] = False  # the first windows see no candidate, the next few fewer than k
    idx, a, eps_final = router_kernel.prefix_route_triton(s, valid, w, k, *ITERS, 9 / 8)
    router = CausalPrefixRouter(4, r, w, n_iters=ITERS[0], eps=ITERS[1], eps_init=ITERS[2], eps_decay=ITERS[3])
    n = -(-t // w)
    want_idx, ok, want_a, want_eps = router._select(s.double(), valid[:, None].expand(b, r, t), n, k)
    assert idx.shape == (b, r, n, k) and eps_final == want_eps
    # the same set of positions (the kernel lists them in position order, topk by score), T when empty
    torch.testing.assert_close(idx.sort(-1).values, want_idx.masked_fill(~ok, t).sort(-1).values, rtol=0, atol=0)
    seen = ok.any(-1)
    assert rel(a[..., 0][seen], want_a[..., 0][seen]) < TOL[torch.float32][0]


def make_cfg(backend, **fields):
    base = {"heads": 4, "causal": True, "heavy_window": 16, "light_window": 8, "window_routed_q": 6,
            "num_routed_kv": 20, "window_routed_ff": 5, "num_kv_routing_tokens": 2, "router_eps": 0.5,
            "router_eps_init": 0.5, "router_iters": 20, "backend": backend}
    return attention.make_config("colt5", {**base, **fields})


@pytest.mark.parametrize("module", ["attention", "feedforward"])
def test_modules_on_the_kernels_match_the_per_window_reference(module):
    """float32 on the Triton routers (and the local kernel) against the float64 per-window reference."""
    cls = RoutedAutoregressiveAttention if module == "attention" else CausalRoutedFeedForward
    torch.manual_seed(0)
    fast = cls(make_cfg("triton"), 24)
    exact = cls(make_cfg("reference"), 24).double()
    exact.load_state_dict(fast.state_dict())
    x = torch.randn(2, 61, 24, generator=gen(0), dtype=torch.float64)
    mask = torch.ones(2, 61, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 50:] = False
    grad = torch.randn(2, 61, 24, generator=gen(1), dtype=torch.float64)
    x32, x64 = x.float().requires_grad_(), x.clone().requires_grad_()
    (fast(x32, mask=mask) * grad.float()).sum().backward()
    fn = autoregressive_reference if module == "attention" else causal_feedforward_reference
    want = fn(exact, x64, mask)
    (want * grad).sum().backward()
    assert rel(fast(x32.detach(), mask=mask), want.detach()) < TOL[torch.float32][0]
    assert rel(x32.grad, x64.grad) < TOL[torch.float32][1]
    params = dict(exact.named_parameters())
    for name, p in fast.named_parameters():
        assert rel(p.grad, params[name].grad) < TOL[torch.float32][1], name
