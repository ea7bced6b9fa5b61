"""CoLT5 causal variants: routed autoregressive attention and the causal routed feed-forward.
No future leak (values and gradients), dense equivalence when everything is routed, peak memory
linear in T, gradients to routers and branches, padding."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch.profiler import ProfilerActivity, profile

import attention
from attention.colt5 import CausalRoutedFeedForward, RoutedAutoregressiveAttention, autoregressive, causal_router
from attention.colt5.reference import autoregressive_reference, causal_feedforward_reference
from attention.layers import merge_heads

DIM = 24


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_cfg(**fields):
    base = {"heads": 4, "causal": True, "heavy_window": 16, "light_window": 8, "window_routed_q": 6,
            "num_routed_kv": 20, "window_routed_ff": 5, "num_kv_routing_tokens": 2}
    return attention.make_config("colt5", {**base, **fields})


def peak_bytes(fn) -> int:
    """Peak of the bytes allocated while fn runs (profiler memory events, CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Self usage: an op's own allocations (inclusive usage would count a clone inside masked_fill twice);
    # frees are the profiler's '[memory]' events.
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def output_and_grads(module, x, mask, fn=None):
    """module(x) (or fn(module, x, mask)) and the gradients of a fixed projection of it: input and every
    parameter."""
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x, mask=mask) if fn is None else fn(module, x, mask)
    (y * randn(*y.shape, seed=99)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


SHAPES = [  # (T, heavy_window, window_routed_q / ff, num_routed_kv, kv routes): odd T, K > window, C = window
    (61, 16, 6, 20, 2), (45, 8, 8, 30, 1), (33, 16, 3, 5, 2)]


@pytest.mark.parametrize("t, w, c, k, routes", SHAPES)
@pytest.mark.parametrize("module", ["attention", "feedforward"])
def test_batched_windows_equal_the_per_window_reference(module, t, w, c, k, routes, monkeypatch):
    """All windows at once (one coordinate descent over every window, one gather, one attention, one
    index_add) give the per-window loop's outputs and gradients, with padding, in float64."""
    torch.manual_seed(6)
    cfg = make_cfg(heavy_window=w, window_routed_q=c, window_routed_ff=c, num_routed_kv=k,
                   num_kv_routing_tokens=routes, router_eps=0.3, router_eps_init=1.0)
    layer = (RoutedAutoregressiveAttention(cfg, DIM) if module == "attention" else CausalRoutedFeedForward(cfg, DIM))
    layer = layer.double()
    x = randn(2, t, DIM, seed=t)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[0, :3] = False  # leading padding: the first window has fewer candidates
    mask[1, t - 9:] = False
    ref = output_and_grads(layer, x, mask, autoregressive_reference if module == "attention"
                           else causal_feedforward_reference)
    chunked = []
    for cap in (autoregressive.GATHER_CHUNK_ELEMENTS, 1):  # one batch of windows, and one window per chunk
        monkeypatch.setattr(autoregressive, "GATHER_CHUNK_ELEMENTS", cap)
        chunked.append(output_and_grads(layer, x, mask))
    for got in chunked:
        torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-10)
        assert set(got[2]) == set(ref[2])
        for name in ref[2]:
            assert ref[2][name] is not None, name
            torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-10, atol=1e-10, msg=name)
    load = layer.aux["router_load_q" if module == "attention" else "router_load_ff"]
    assert 0 < float(load) < 1  # the routing is not trivial: some slots used, some empty


@pytest.mark.parametrize("module", ["attention", "feedforward"])
def test_no_future_leak_in_values_or_gradients(module):
    torch.manual_seed(0)
    cfg = make_cfg()
    layer = (RoutedAutoregressiveAttention(cfg, DIM) if module == "attention"
             else CausalRoutedFeedForward(cfg, DIM)).double()
    x = randn(2, 70, DIM, seed=1)
    y = layer(x)
    for j in (3, 16, 17, 40, 69):  # window starts, middles, the end
        x2 = x.clone()
        x2[:, j] += 3 * randn(2, DIM, seed=j)
        y2 = layer(x2)
        torch.testing.assert_close(y2[:, :j], y[:, :j], rtol=0, atol=1e-12)
        assert (y2[:, j:] - y[:, j:]).abs().max() > 1e-4  # the change does reach position j onwards
    xg = x.clone().requires_grad_()
    layer(xg)[:, :33].sum().backward()
    assert torch.all(xg.grad[:, 33:] == 0) and xg.grad[:, :33].abs().sum() > 0


def test_every_token_routed_equals_light_plus_block_causal_dense_attention():
    torch.manual_seed(1)
    w, t = 8, 29
    # Route every query of every window (capacity w; a zero routing token scores all tokens 0, so
    # every threshold keeps them all) and every past key/value: the heavy branch is dense attention
    # of window n's queries over keys < n * w plus the null key.
    layer = RoutedAutoregressiveAttention(make_cfg(heavy_window=w, window_routed_q=w, num_routed_kv=t), DIM).double()
    with torch.no_grad():
        layer.q_router.routing_token.zero_()
    x = randn(2, t, DIM, seed=2)
    attn = layer.attn
    q = rearrange(attn.to_q(x), "b t (h d) -> b h t d", h=attn.heads)
    k, v = rearrange(torch.einsum("bsd,rde->brse", x, attn.to_kv), "b r s (two g d) -> two b (r g) s d",
                     two=2, g=attn.group)
    null_k, null_v = (n[None, :, None].expand(2, -1, 1, -1) for n in attn.null_kv)
    k, v = torch.cat([null_k, k], 2), torch.cat([null_v, v], 2)  # (B, H, 1 + T, D)
    pos = torch.arange(t)
    allowed = torch.cat([torch.ones(t, 1, dtype=torch.bool), pos[None, :] < (pos[:, None] // w) * w], 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    heavy = attn.to_out(merge_heads((probs @ v).transpose(1, 2)))
    torch.testing.assert_close(layer(x), layer.light(x) + heavy, rtol=1e-10, atol=1e-10)


def test_causal_feedforward_routes_per_window_capacity_and_matches_dense_when_all_routed():
    torch.manual_seed(2)
    ff = CausalRoutedFeedForward(make_cfg(heavy_window=8, window_routed_ff=8), DIM).double()
    with torch.no_grad():
        ff.router.routing_token.zero_()  # all scores 0: every threshold keeps every token
    x = randn(2, 29, DIM, seed=3)
    torch.testing.assert_close(ff(x), ff.light(x) + ff.heavy(x), rtol=1e-10, atol=1e-10)
    routed = CausalRoutedFeedForward(make_cfg(heavy_window=8, window_routed_ff=3), DIM).double().router(x, 3)
    assert routed.indices.shape == (2, 4, 3) and routed.mask.sum(-1).max() <= 3
    starts = torch.arange(4)[None, :, None] * 8
    real = routed.indices[routed.mask]
    assert torch.all((real >= starts.expand_as(routed.indices)[routed.mask])
                     & (real < (starts + 8).expand_as(routed.indices)[routed.mask]))


def test_gradients_reach_routers_and_both_branches_and_padding_is_zero():
    torch.manual_seed(3)
    cfg = make_cfg(router_eps=0.5, router_eps_init=0.5)
    layer = RoutedAutoregressiveAttention(cfg, DIM).double()
    x = randn(2, 50, DIM, seed=4)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 41:] = False
    y = layer(x, mask=mask)
    assert torch.all(y[~mask] == 0)
    (y * randn(2, 50, DIM, seed=5)).sum().backward()
    params = dict(layer.named_parameters())
    for name in ("q_router.routing_token", "q_router.first_threshold", "kv_router.routing_tokens",
                 "attn.to_q.weight", "attn.to_kv", "attn.null_kv", "null_q_out", "light.qkv.to_q.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert 0 < float(layer.aux["router_load_q"]) <= 1


def test_peak_memory_is_linear_in_sequence_length(monkeypatch):
    """Regression (DESIGN.md peers): the original copied the sequence per window, T^2 / w memory.

    The prefix router's (windows x T) working set is capped by PREFIX_CHUNK_ELEMENTS (4M in use); a
    small cap here puts these small sizes in the regime every size above the cap is in."""
    monkeypatch.setattr(causal_router, "PREFIX_CHUNK_ELEMENTS", 1 << 14)
    torch.manual_seed(4)
    cfg = make_cfg(heads=2, heavy_window=16, light_window=16, window_routed_q=4, num_routed_kv=32,
                   num_kv_routing_tokens=1, router_iters=10)
    layer = RoutedAutoregressiveAttention(cfg, 16)

    def fwd_bwd(t):
        x = randn(1, t, 16, seed=t, dtype=torch.float32).requires_grad_()
        return lambda: layer(x).sum().backward()

    def original_copy(t):  # what colt5-attention does: every window gets its own copy of the sequence
        x = randn(1, t, 16, seed=t, dtype=torch.float32)
        return lambda: x[:, None].expand(-1, t // 16, -1, -1).contiguous().sum()

    peaks = [peak_bytes(fwd_bwd(t)) for t in (512, 1024, 2048)]
    copies = [peak_bytes(original_copy(t)) for t in (512, 1024, 2048)]
    assert copies[2] / copies[1] > 3.5  # the probe sees quadratic growth when there is some
    assert peaks[1] / peaks[0] <= 2.2 and peaks[2] / peaks[1] <= 2.2, peaks


def test_decoder_uses_the_causal_variants_and_trains():
    from attention.models import DecoderLM
    torch.manual_seed(5)
    model = DecoderLM(make_cfg(causal=False), vocab=40, dim=DIM, depth=1, max_len=48)  # made causal
    block = model.body.blocks[0]
    assert isinstance(block.mixer, RoutedAutoregressiveAttention)
    assert isinstance(block.ff, CausalRoutedFeedForward)
    tokens = torch.randint(0, 40, (2, 40))  # shorter than max_len: routed counts clamp to the window
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)


def test_cuda_graphs_knob_is_validated_and_cpu_inputs_run_eagerly():
    import copy

    from attention.config import ConfigError

    with pytest.raises(ConfigError, match="cuda_graphs"):
        make_cfg(cuda_graphs="yes")
    for cls in (RoutedAutoregressiveAttention, CausalRoutedFeedForward):
        layer = cls(make_cfg(), DIM)
        x = randn(2, 20, DIM, dtype=torch.float32)
        torch.testing.assert_close(layer(x), layer.forward_eager(x), rtol=0, atol=0)
        assert layer._graphs.entries == {}  # nothing captured off CUDA
        twin = copy.deepcopy(layer)  # the graph cache is not copied; the copy's cache is its own
        assert twin._graphs.owner is twin and twin._graphs is not layer._graphs
