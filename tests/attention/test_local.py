"""Local (sliding-window) attention: blocked op vs dense float64 reference, mixer, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attention
from attention.config import ConfigError
from attention.local import LocalConfig, local_attention, local_attention_reference, local_band_mask
from attention.models import DecoderLM

# (window_size, look_backward, look_forward, causal); T = 63 is a multiple of none of the windows but 7
CASES = [(8, 1, 0, True), (8, 1, 1, False), (5, 2, 3, False), (7, 0, 2, False), (1, 0, 0, True),
         (16, 3, 0, True), (100, 1, 1, False), (4, 0, 0, False)]


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (bytes) any op produces: what an op really allocates."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


def make_qkv(dtype, b=2, t=63, h=2, d=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def padding_mask(b, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, :5] = False  # a run of padding covering a whole small window
    return mask


def test_band_mask_is_the_positionwise_definition():
    t, w, lb, lf = 11, 3, 1, 1
    for causal in (False, True):
        expected = torch.tensor([[(i // w - lb <= j // w <= i // w + lf) and (j <= i or not causal)
                                  for j in range(t)] for i in range(t)])
        assert torch.equal(local_band_mask(t, w, lb, lf, causal), expected)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("window_size,look_backward,look_forward,causal", CASES)
def test_blocked_matches_reference_float64(window_size, look_backward, look_forward, causal, use_mask):
    q, k, v = make_qkv(torch.float64)
    mask = padding_mask(2, 63) if use_mask else None
    kw = dict(window_size=window_size, look_backward=look_backward, look_forward=look_forward,
              causal=causal, key_mask=mask)
    out = local_attention(q, k, v, **kw)
    ref = local_attention_reference(q, k, v, **kw)
    assert out.shape == ref.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g_got, g_want in zip(got, want):
        assert torch.isfinite(g_got).all()
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window_size,look_backward,look_forward,causal", [(8, 1, 0, True), (5, 2, 1, False)])
def test_float32_against_float64_reference(window_size, look_backward, look_forward, causal):
    q, k, v = make_qkv(torch.float64, seed=3)
    mask = padding_mask(2, 63)
    kw = dict(window_size=window_size, look_backward=look_backward, look_forward=look_forward,
              causal=causal, key_mask=mask)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = local_attention(q32, k32, v32, **kw)
    ref = local_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)  # float32 tolerance
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q32, k32, v32), grad.float())
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got.double(), g_want, rtol=0, atol=1e-5)


def test_query_with_no_visible_key_gets_zeros():
    q, k, v = make_qkv(torch.float64, b=1, t=20, h=1, d=4)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, :8] = False  # window_size 4, look_backward 1: queries 0..7 see only padded keys
    out = local_attention(q, k, v, window_size=4, look_backward=1, look_forward=0, causal=True, key_mask=mask)
    assert torch.equal(out[0, :8], torch.zeros_like(out[0, :8]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_memory_is_linear_in_sequence_length():
    # T x T float32 scores would be 67 MB; the blocked op's largest tensor is (T/W) x W x 2W.
    t, w = 4099, 16
    q, k, v = (x.detach().float().requires_grad_() for x in make_qkv(torch.float64, b=1, t=t, h=1, d=8))
    with LargestStorage() as probe:
        out = local_attention(q, k, v, window_size=w, look_backward=1, look_forward=0, causal=True)
        out.sum().backward()
    n_keys_seen = 2 * w  # own window + one behind
    bound = 2 * (t + w) * n_keys_seen * 8  # float64 margin on (T padded) x 2W scores
    assert probe.nbytes <= bound < t * t * 4 / 16


def build_local(**fields):
    return attention.build(attention.make_config("local", **fields), 120).double()


def test_registered_with_capabilities():
    spec = attention.get("local")
    assert spec.config_cls is LocalConfig
    assert (spec.capabilities.causal, spec.capabilities.cross, spec.capabilities.padding_mask) == (
        True, False, True)


def test_mixer_output_is_the_op_on_its_projections():
    torch.manual_seed(0)
    mixer = build_local(window_size=6, look_backward=2, heads=2)
    x = torch.randn(2, 63, 120, dtype=torch.float64)
    mask = padding_mask(2, 63)
    q, k, v = mixer.qkv(x)
    ref = local_attention_reference(q, k, v, window_size=6, look_backward=2, look_forward=1, key_mask=mask)
    expected = mixer.to_out(ref.flatten(2)) * mask[..., None]
    torch.testing.assert_close(mixer(x, mask=mask), expected, rtol=0, atol=1e-12)


def test_causal_mixer_does_not_see_the_future():
    torch.manual_seed(0)
    mixer = build_local(window_size=8, look_backward=2, causal=True)
    x = torch.randn(2, 63, 120, dtype=torch.float64)
    changed = x.clone()
    changed[:, 30] += torch.randn(2, 120, dtype=torch.float64)
    y, y_changed = mixer(x), mixer(changed)
    assert torch.equal(y[:, :30], y_changed[:, :30])
    assert not torch.allclose(y[:, 30], y_changed[:, 30])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_changes_nothing_at_real_positions(causal):
    torch.manual_seed(0)
    mixer = build_local(window_size=5, causal=causal)
    x = torch.randn(2, 63, 120, dtype=torch.float64)
    mask = padding_mask(2, 63)
    changed = torch.where(mask[..., None], x, torch.randn_like(x) * 10)
    y, y_changed = mixer(x, mask=mask), mixer(changed, mask=mask)
    torch.testing.assert_close(y, y_changed, rtol=0, atol=1e-12)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))


def test_cross_attention_is_refused():
    mixer = build_local(window_size=4)
    x = torch.randn(1, 8, 120, dtype=torch.float64)
    with pytest.raises(ValueError, match="cross attention"):
        mixer(x, context=x)


def test_decoder_lm_trains_and_is_causal():
    torch.manual_seed(0)
    cfg = attention.make_config("local", window_size=8, heads=2)  # non-causal; DecoderLM makes it causal
    model = DecoderLM(cfg, vocab=17, dim=60, depth=2, max_len=63).double()
    tokens = torch.randint(0, 17, (2, 63))
    logits = model(tokens)
    assert logits.shape == (2, 63, 17)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 17
    with torch.no_grad():
        assert torch.equal(model(tokens)[:, :40], model(changed)[:, :40])


def test_look_forward_default_follows_causal():
    assert LocalConfig(causal=True).forward_windows == 0
    assert LocalConfig(causal=False).forward_windows == 1
    assert LocalConfig(causal=False, look_forward=3).forward_windows == 3
    assert dataclasses.replace(LocalConfig(), causal=True).forward_windows == 0


@pytest.mark.parametrize("fields,field", [
    ({"window_size": 0}, "local.window_size"),
    ({"window_size": 2.5}, "local.window_size"),
    ({"look_backward": -1}, "local.look_backward"),
    ({"look_forward": -1}, "local.look_forward"),
    ({"look_forward": 1, "causal": True}, "local.look_forward"),
    ({"heads": 0}, "local.heads"),
    ({"window": 8}, "window"),
])
def test_bad_config_raises_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        attention.make_config("local", **fields)


def test_decoder_refuses_look_forward():
    cfg = attention.make_config("local", window_size=8, look_forward=1)
    with pytest.raises(ConfigError, match="local.look_forward"):
        DecoderLM(cfg, vocab=5, dim=16, depth=1, max_len=16)
