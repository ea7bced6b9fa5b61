"""CoLT5 router and bidirectional routed attention: dense equivalence, masks, batch independence,
gradients, route blocks, bf16 autocast."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from einops import rearrange

import attention
from attention.colt5 import Colt5Config, CoordinateDescentRouter, RoutedAttention
from attention.colt5.heavy import HeavyAttention
from attention.colt5.router import gather_tokens, scatter_tokens
from attention.layers import merge_heads
from attention.softmax.reference import softmax_attention_reference

T, DIM = 37, 24


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_cfg(**fields) -> Colt5Config:
    base = {"heads": 4, "num_routed_q": 9, "num_routed_kv": 11, "num_routed_ff": 7, "light_window": 8,
            "num_kv_routing_tokens": 2}
    return attention.make_config("colt5", {**base, **fields})


def dense_heavy(attn: HeavyAttention, q_tokens, kv_tokens, kv_mask=None, causal_blocks=None):
    """Heavy attention of every query over every key (plus the null key), from the module's weights
    alone: q (B, T, H, D); route r's projection gives heads r*G .. r*G + G - 1."""
    b = q_tokens.shape[0]
    q = rearrange(attn.to_q(q_tokens), "b t (h d) -> b t h d", h=attn.heads)
    kv = torch.einsum("bsd,rde->brse", kv_tokens, attn.to_kv)
    k, v = rearrange(kv, "b r s (two g d) -> two b s (r g) d", two=2, g=attn.group)
    null_k, null_v = (n[None, None].expand(b, 1, -1, -1) for n in attn.null_kv)
    k, v = torch.cat([null_k, k], 1), torch.cat([null_v, v], 1)
    keys_ok = torch.ones(b, k.shape[1], dtype=torch.bool)
    if kv_mask is not None:
        keys_ok[:, 1:] = kv_mask
    out = softmax_attention_reference(q, k, v, key_mask=keys_ok)
    return attn.to_out(merge_heads(out))


def test_gather_uses_each_samples_own_tokens():
    """Regression (DESIGN.md peers): multi-token kv routing gathered from the wrong batch element."""
    x = torch.arange(3 * 5, dtype=torch.float64).view(3, 5, 1).expand(3, 5, 2)  # x[b, t] = 5b + t
    idx = torch.tensor([[[0, 4], [1, 2]], [[3, 0], [4, 4]], [[2, 2], [0, 1]]])  # (B=3, R=2, K=2)
    got = gather_tokens(x, idx)[..., 0]
    assert torch.equal(got, (idx + 5 * torch.arange(3).view(3, 1, 1)).double())
    base = torch.zeros(2, 4, 1)
    out = scatter_tokens(base, torch.tensor([[3, 4], [0, 4]]), torch.ones(2, 2, 1))  # 4 = T: empty slot
    assert out[:, :, 0].tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]


def test_router_selects_top_scores_with_unit_gates_and_respects_padding():
    torch.manual_seed(0)
    router = CoordinateDescentRouter(DIM, 2, n_iters=50, eps=0.1, eps_init=1.0, eps_decay=0.85).double()
    x = randn(2, T, DIM, seed=1)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 5:] = False  # sample 1 has 5 real tokens but 8 are routed
    routed = router(x, 8, mask)
    assert routed.indices.shape == (2, 2, 8)
    scores = router.scores(x).masked_fill(~mask[:, None], float("-inf"))
    assert torch.equal(routed.indices[0].sort(-1).values, scores[0].topk(8).indices.sort(-1).values)
    torch.testing.assert_close(routed.gates[0], torch.ones(2, 8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert routed.mask[1].sum() == 2 * 5 and torch.all(routed.gates[1][~routed.mask[1]] == 0)
    assert set(routed.indices[1][routed.mask[1]].tolist()) == set(range(5))
    assert float(routed.unconverged) == 0.0


def test_router_in_blocks_routes_evenly_and_marks_the_padding_empty():
    router = CoordinateDescentRouter(DIM, 1, n_iters=30, eps=0.1, eps_init=1.0, eps_decay=0.85,
                                     route_block_size=10).double()
    routed = router(randn(1, T, DIM, seed=2), 12)  # 4 blocks (10, 10, 10, 7) x 3 tokens
    idx = routed.indices[0, 0]
    assert idx.shape == (12,)
    assert [int(((idx >= s) & (idx < s + 10)).sum()) for s in (0, 10, 20, 30)] == [3, 3, 3, 3]
    short = CoordinateDescentRouter(DIM, 1, n_iters=30, eps=0.1, eps_init=1.0, eps_decay=0.85,
                                    route_block_size=16).double()
    routed = short(randn(1, 20, DIM, seed=3), 16)  # blocks of 16 and 4 real (+12 padding) tokens, 8 each
    assert int((~routed.mask).sum()) == 4 and torch.all(routed.indices[~routed.mask] == 20)


@pytest.mark.parametrize("routes", [1, 2])
def test_every_token_routed_equals_light_plus_dense_attention(routes):
    torch.manual_seed(1)
    cfg = make_cfg(num_routed_q=T, num_routed_kv=T, num_kv_routing_tokens=routes)
    mixer = RoutedAttention(cfg, DIM).double()
    x = randn(2, T, DIM, seed=4)
    want = mixer.light(x) + dense_heavy(mixer.heavy.attn, x, x)
    torch.testing.assert_close(mixer(x), want, rtol=1e-10, atol=1e-10)


def test_padding_is_zero_and_invisible():
    torch.manual_seed(2)
    mixer = RoutedAttention(make_cfg(), DIM).double()
    x = randn(2, T, DIM, seed=5)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, :6] = False
    y = mixer(x, mask=mask)
    assert torch.all(y[~mask] == 0)
    x2 = x.clone()
    x2[~mask] = randn(int((~mask).sum()), DIM, seed=6) * 10  # new content at padded positions only
    torch.testing.assert_close(mixer(x2, mask=mask), y, rtol=0, atol=1e-12)


def test_sample_output_does_not_depend_on_the_rest_of_the_batch():
    """Regression: batch > 1 with several kv routing tokens."""
    torch.manual_seed(3)
    mixer = RoutedAttention(make_cfg(num_kv_routing_tokens=4), DIM).double()
    x = randn(3, T, DIM, seed=7)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[2, 20:] = False
    together = mixer(x, mask=mask)
    for i in range(3):
        torch.testing.assert_close(mixer(x[i:i + 1], mask=mask[i:i + 1]), together[i:i + 1],
                                   rtol=1e-12, atol=1e-12)


def test_gradients_reach_both_routers_and_both_branches():
    torch.manual_seed(4)
    # A soft router (eps 0.5): routed gates sit below 1 and carry gradient (README: router gradient).
    mixer = RoutedAttention(make_cfg(router_eps=0.5, router_eps_init=0.5), DIM).double()
    x = randn(2, T, DIM, seed=8).requires_grad_()
    (mixer(x) * randn(2, T, DIM, seed=9)).sum().backward()
    for name in ("heavy.q_router.routing_tokens", "heavy.kv_router.routing_tokens", "heavy.attn.to_q.weight",
                 "heavy.attn.to_kv", "heavy.attn.null_kv", "heavy.null_q_out", "light.qkv.to_q.weight"):
        grad = dict(mixer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bf16_autocast_runs_and_routes_in_float32():
    torch.manual_seed(5)
    mixer = RoutedAttention(make_cfg(), DIM)
    x = randn(2, T, DIM, seed=10, dtype=torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
        scores = mixer.heavy.q_router.scores(x)
    assert scores.dtype == torch.float32 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    # Under autocast the routing decision is the float32 one.
    routed32 = mixer.heavy.q_router(x.detach(), 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed16 = mixer.heavy.q_router(x.detach(), 9)
    assert torch.equal(routed32.indices, routed16.indices)


def test_config_checks_name_the_field():
    with pytest.raises(attention.ConfigError, match=r"colt5.num_routed_q: got 64 routed tokens for sequences of 40"):
        make_cfg(num_routed_q=64).check_seq_len(40)
    with pytest.raises(attention.ConfigError, match="colt5.num_kv_routing_tokens"):
        make_cfg(num_kv_routing_tokens=3)
    with pytest.raises(attention.ConfigError, match="colt5.window_routed_ff: got 200 tokens per window"):
        make_cfg(window_routed_ff=200, causal=True)
    with pytest.raises(attention.ConfigError, match="colt5.num_routed_q: got 9 for 12 route blocks"):
        make_cfg(route_block_size=10).check_seq_len(120)
    with pytest.raises(attention.ConfigError, match="colt5.cross_attention"):
        make_cfg(cross_attention=True, causal=True)
    make_cfg(num_routed_q=500, causal=True).check_seq_len(100)  # not used when causal
    assert dataclasses.replace(make_cfg(), route_ff=False).num_routed_ff == 7
