"""CoLT5 routed feed-forward, cross attention (up to a million context tokens), image attention, the
full block, the routed ViT, and the registry wiring."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

import attention
from attention.colt5 import RoutedCrossAttention, RoutedFeedForward
from attention.colt5.block import Colt5Block
from attention.colt5.image import RoutedImageAttention, WindowAttention
from attention.models import Encoder, RoutedViT
from attention.softmax.reference import softmax_attention_reference

DIM = 24


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_cfg(**fields):
    base = {"heads": 4, "num_routed_q": 9, "num_routed_kv": 11, "num_routed_ff": 7, "light_window": 8,
            "num_kv_routing_tokens": 2}
    return attention.make_config("colt5", {**base, **fields})


# ---- feed-forward -----------------------------------------------------------------------------------

def test_feedforward_every_token_routed_equals_light_plus_dense_heavy():
    torch.manual_seed(0)
    ff = RoutedFeedForward(make_cfg(num_routed_ff=33), DIM).double()
    x = randn(2, 33, DIM, seed=1)
    torch.testing.assert_close(ff(x), ff.light(x) + ff.heavy(x), rtol=1e-12, atol=1e-12)


def test_feedforward_routes_k_tokens_masks_padding_and_learns_the_router():
    torch.manual_seed(1)
    ff = RoutedFeedForward(make_cfg(num_routed_ff=5, router_eps=0.5, router_eps_init=0.5), DIM).double()
    x = randn(3, 33, DIM, seed=2).requires_grad_()
    mask = torch.ones(3, 33, dtype=torch.bool)
    mask[2, 3:] = False  # 3 real tokens, 5 routed: two empty slots
    y = ff(x, mask=mask)
    heavy_rows = (y - ff.light(x) * mask[..., None]).abs().sum(-1) > 1e-12
    assert heavy_rows.sum(-1).tolist() == [5, 5, 3] and torch.all(y[~mask] == 0)
    (y * randn(3, 33, DIM, seed=3)).sum().backward()
    for name, p in ff.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.testing.assert_close(ff(x[:1], mask=mask[:1]), y[:1], rtol=1e-12, atol=1e-12)  # batch-independent


# ---- cross attention --------------------------------------------------------------------------------

def test_cross_attention_every_token_routed_equals_dense_and_is_batch_independent():
    torch.manual_seed(2)
    cross = RoutedCrossAttention(make_cfg(cross_attention=True, num_routed_q=13, num_routed_kv=21), DIM).double()
    x, context = randn(3, 13, DIM, seed=4), randn(3, 21, DIM, seed=5)
    context_mask = torch.ones(3, 21, dtype=torch.bool)
    context_mask[1, 15:] = False
    attn = cross.attn
    q = rearrange(attn.to_q(x), "b t (h d) -> b t h d", h=attn.heads)
    k, v = rearrange(torch.einsum("bsd,rde->brse", context, attn.to_kv), "b r s (two g d) -> two b s (r g) d",
                     two=2, g=attn.group)
    null_k, null_v = (n[None, None].expand(3, 1, -1, -1) for n in attn.null_kv)
    keys_ok = torch.cat([torch.ones(3, 1, dtype=torch.bool), context_mask], 1)
    dense = softmax_attention_reference(q, torch.cat([null_k, k], 1), torch.cat([null_v, v], 1),
                                        key_mask=keys_ok)
    want = attn.to_out(rearrange(dense, "b t h d -> b t (h d)"))
    got = cross(x, context=context, context_mask=context_mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    routed = RoutedCrossAttention(make_cfg(cross_attention=True, num_kv_routing_tokens=4), DIM).double()
    together = routed(x, context=context, context_mask=context_mask)
    for i in range(3):
        alone = routed(x[i:i + 1], context=context[i:i + 1], context_mask=context_mask[i:i + 1])
        torch.testing.assert_close(alone, together[i:i + 1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs context"):
        routed(x)


def test_cross_attention_over_a_million_context_tokens_in_blocks():
    """Regression (DESIGN.md peers): the original's cross attention referenced an undefined name."""
    torch.manual_seed(3)
    cfg = make_cfg(cross_attention=True, heads=2, num_routed_q=8, num_routed_kv=256, route_block_size=1 << 16,
                   router_iters=5)
    cross = RoutedCrossAttention(cfg, 8)
    x, context = randn(1, 32, 8, seed=6, dtype=torch.float32), randn(1, 1 << 20, 8, seed=7, dtype=torch.float32)
    with torch.no_grad():
        y = cross(x, context=context)
        routed = cross.kv_router(context, 256)
    assert y.shape == (1, 32, 8) and torch.isfinite(y).all()
    per_block = torch.bincount(routed.indices[0].flatten() // (1 << 16), minlength=16)
    assert per_block.tolist() == [2 * 16] * 16  # 2 routes x 16 per block: every block contributes


# ---- image attention, block, ViT --------------------------------------------------------------------

def test_window_attention_is_dense_attention_inside_each_window():
    torch.manual_seed(4)
    light = WindowAttention(DIM, 2, 6, side=4).double()
    fmap = randn(1, 6, 7, DIM, seed=8)  # 2 x 2 windows, the right and bottom ones padded
    got = light(fmap)
    q, k, v = light.qkv(rearrange(fmap, "b h w c -> b (h w) c"))
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(7), indexing="ij")
    window = (rows // 4 * 2 + cols // 4).flatten()
    same = window[:, None] == window[None, :]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * 6 ** -0.5
    probs = scores.masked_fill(~same, float("-inf")).softmax(-1)
    want = light.to_out(rearrange(torch.einsum("bhij,bjhd->bihd", probs, v), "b t h d -> b t (h d)"))
    torch.testing.assert_close(got, rearrange(want, "b (h w) c -> b h w c", h=6), rtol=1e-12, atol=1e-12)


def test_image_attention_channel_first_equals_channel_last_and_heavy_windows_are_independent():
    torch.manual_seed(5)
    cfg = make_cfg(num_routed_q=6, num_routed_kv=8)
    last = RoutedImageAttention(DIM, cfg, light_window=4, heavy_window=8).double()
    first = RoutedImageAttention(DIM, cfg, light_window=4, heavy_window=8, channel_first=True).double()
    first.load_state_dict(last.state_dict())
    fmap = randn(2, 16, 12, DIM, seed=9)
    y = last(fmap)
    torch.testing.assert_close(first(rearrange(fmap, "b h w c -> b c h w")), rearrange(y, "b h w c -> b c h w"))
    changed = fmap.clone()
    changed[:, 12, 9] += 5.0  # inside heavy window (1, 1); every other window must not move
    y2 = last(changed)
    torch.testing.assert_close(y2[:, :8], y[:, :8], rtol=0, atol=1e-12)
    torch.testing.assert_close(y2[:, :, :8], y[:, :, :8], rtol=0, atol=1e-12)
    assert (y2[:, 8:, 8:] - y[:, 8:, 8:]).abs().max() > 1e-3


def test_image_attention_runs_on_the_readme_example():
    torch.manual_seed(6)
    attn = RoutedImageAttention(32, attention.make_config(
        "colt5", heads=8, dim_head=64, num_routed_q=1024, num_routed_kv=1024, num_kv_routing_tokens=4),
        light_window=8, heavy_window=128, channel_first=True)
    fmap = torch.randn(1, 32, 256, 256)
    with torch.no_grad():
        out = attn(fmap) + fmap
    assert out.shape == fmap.shape and torch.isfinite(out).all()
    assert float(attn.aux["router_unconverged_q"]) == 0.0


@pytest.mark.parametrize("causal", [False, True])
def test_block_residuals_and_gradients(causal):
    torch.manual_seed(7)
    cfg = make_cfg(causal=causal, heavy_window=16, window_routed_q=4, window_routed_ff=4)
    block = Colt5Block(cfg, DIM).double()
    x = randn(2, 40, DIM, seed=10).requires_grad_()
    y = block(x)
    assert y.shape == x.shape and set(block.aux) >= {"router_unconverged_q", "router_unconverged_ff"}
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and block.attn_norm.weight.grad.abs().sum() > 0
    dense_ff = Colt5Block(make_cfg(route_ff=False), DIM)
    assert not hasattr(dense_ff.ff, "router") and dense_ff(randn(1, 20, DIM, dtype=torch.float32)).shape == (1, 20, DIM)


def test_routed_vit_classifies_and_trains():
    torch.manual_seed(8)
    cfg = make_cfg(num_routed_q=16, num_routed_kv=16, num_routed_ff=16)
    vit = RoutedViT(cfg, image_size=28, patch_size=4, num_classes=10, dim=32, depth=2, channels=1)
    images, labels = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(vit(images), labels)
    loss.backward()
    assert torch.isfinite(loss) and vit.to_patches.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of patch_size"):
        RoutedViT(cfg, image_size=30, patch_size=4, num_classes=10, dim=32, depth=1)


def test_registry_builds_mixer_and_feedforward_and_checks_lengths():
    spec = attention.get("colt5")
    assert spec.capabilities.causal and spec.capabilities.cross and spec.feedforward is not None
    encoder = Encoder(make_cfg(), dim=DIM, depth=1, max_len=64)
    assert isinstance(encoder.body.blocks[0].ff, RoutedFeedForward)
    assert attention.build_feedforward(make_cfg(route_ff=False), DIM) is None
    with pytest.raises(attention.ConfigError, match="colt5.num_routed_kv"):
        Encoder(make_cfg(num_routed_q=8, num_routed_kv=100), dim=DIM, depth=1, max_len=64)
    x = torch.randn(2, 64, DIM)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[0, 50:] = False
    assert encoder(x, mask=mask).shape == x.shape
