"""HoMM: cumulative-sum moments == the original's dense triangular averaging == step-by-step decoding,
gradients against float64, causality, padding, the original module's equations, mixer and model."""

import pytest
import torch
import torch.nn.functional as F

import attention
from attention.config import ConfigError
from attention.homm import HoMM, expand_moments, init_moment_state, moment_mix, moment_mix_reference, moment_step
from attention.models import DecoderLM

B, T, FEAT, DIM = 2, 65, 60, 36
TOL64 = {"atol": 1e-12, "rtol": 1e-12}
TOL32 = {"atol": 2e-6, "rtol": 2e-6}  # float32 sums of 65 terms against float64


def inputs(dtype=torch.float64, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    moments = torch.randn(B, t, FEAT, generator=g, dtype=dtype)
    select = torch.sigmoid(torch.randn(B, t, FEAT, generator=g, dtype=dtype))
    return moments, select


def padding_mask(t=T, seed=1):
    mask = torch.rand(B, t, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, :4] = False  # leading padding: the first queries see no real token
    mask[1, -6:] = False
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cumsum_matches_dense_triangular_float64(causal, masked):
    moments, select = inputs()
    mask = padding_mask() if masked else None
    out = moment_mix(moments, select, causal=causal, key_mask=mask)
    torch.testing.assert_close(out, moment_mix_reference(moments, select, causal=causal, key_mask=mask), **TOL64)
    if masked and causal:
        assert torch.all(out[0, :4] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_output_and_grads_match_float64(causal):
    moments, select = inputs(torch.float32, seed=2)
    mask = padding_mask(seed=3)
    g = torch.randn(B, T, FEAT, generator=torch.Generator().manual_seed(4))
    m32, s32 = (t.clone().requires_grad_() for t in (moments, select))
    m64, s64 = (t.double().requires_grad_() for t in (moments, select))
    out32 = moment_mix(m32, s32, causal=causal, key_mask=mask)
    out64 = moment_mix_reference(m64, s64, causal=causal, key_mask=mask)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, out64.float(), **TOL32)
    (out32 * g).sum().backward()
    (out64 * g.double()).sum().backward()
    torch.testing.assert_close(m32.grad, m64.grad.float(), **TOL32)
    torch.testing.assert_close(s32.grad, s64.grad.float(), **TOL32)
    assert torch.all(m32.grad[~mask] == 0)  # padded tokens get no gradient: they are not in any mean


def test_steps_match_dense_triangular_float64():
    moments, select = inputs(seed=5)
    state = init_moment_state(B, FEAT, dtype=torch.float64)
    outs = []
    for t in range(T):
        out_t, state = moment_step(moments[:, t], select[:, t], state)
        outs.append(out_t)
        assert state.total.shape == (B, FEAT)  # O(1) in t
    expected = moment_mix_reference(moments, select, causal=True)
    torch.testing.assert_close(torch.stack(outs, 1), expected, **TOL64)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs(dtype, tol):
    moments, select = inputs(dtype, t=1000, seed=6)
    out = moment_mix(moments + 1.0, select, causal=True)  # a nonzero mean: running sums grow with t
    expected = moment_mix_reference(moments.double() + 1.0, select.double(), causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_expand_moments_are_running_products():
    h = torch.randn(B, T, 3 * 7, dtype=torch.float64)
    a, b, c = h.chunk(3, -1)
    torch.testing.assert_close(expand_moments(h, 3), torch.cat([a, a * b, a * b * c], -1), **TOL64)
    torch.testing.assert_close(expand_moments(h, 1), h, **TOL64)


def build_homm(dim=DIM, **fields):
    return attention.build(attention.make_config("homm", **fields), dim).double()


@pytest.mark.parametrize("order,order_expand,dim_hidden", [(1, 1, 0), (2, 2, 0), (3, 1, 20)])
def test_mixer_follows_the_original_equations(order, order_expand, dim_hidden):
    # The original HoM: h = gelu(ho_proj x) in `order` chunks, chunk i *= chunk i-1, mean over
    # tokens, s = sigmoid(se_proj x), out = ag_proj(s * h). Written out here independently.
    torch.manual_seed(7)
    mixer = build_homm(order=order, order_expand=order_expand, dim_hidden=dim_hidden)
    width = order * order_expand * (dim_hidden or DIM)
    assert mixer.to_moments.out_features == width and mixer.to_out.in_features == width
    x = torch.randn(B, 17, DIM, dtype=torch.float64)
    chunks = list(F.gelu(x @ mixer.to_moments.weight.T + mixer.to_moments.bias).chunk(order, -1))
    for i in range(1, order):
        chunks[i] = chunks[i] * chunks[i - 1]
    h = torch.cat(chunks, -1).mean(1, keepdim=True)
    s = torch.sigmoid(x @ mixer.to_select.weight.T + mixer.to_select.bias)
    expected = (s * h) @ mixer.to_out.weight.T + mixer.to_out.bias
    torch.testing.assert_close(mixer(x), expected, **TOL64)


def test_mixer_causal_forward_equals_steps_and_does_not_leak():
    torch.manual_seed(8)
    mixer = build_homm(causal=True, order=3).eval()
    assert attention.get("homm").capabilities.recurrent
    x = torch.randn(B, 23, DIM, dtype=torch.float64)
    y = mixer(x)
    state = mixer.init_state(B, dtype=x.dtype)
    steps = []
    for t in range(x.shape[1]):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y, **TOL64)
    for t in (0, 11, 22):
        x2 = x.clone()
        x2[:, t] += 2.0
        y2 = mixer(x2)
        assert torch.equal(y2[:, :t], y[:, :t]), t
        assert not torch.allclose(y2[:, t:], y[:, t:])


@pytest.mark.parametrize("causal", [False, True])
def test_mixer_padding_excluded_from_moments_and_counts(causal):
    torch.manual_seed(9)
    mixer = build_homm(causal=causal).eval()
    x = torch.randn(B, 19, DIM, dtype=torch.float64)
    mask = torch.ones(B, 19, dtype=torch.bool)
    mask[1, 12:] = False
    y = mixer(x, mask=mask)
    assert torch.all(y[1, 12:] == 0)
    x2 = x.clone()
    x2[1, 12:] = 100.0  # whatever sits in the padding
    torch.testing.assert_close(mixer(x2, mask=mask), y, **TOL64)
    # equals the same sequence without its padding: padded tokens are not counted in the means
    torch.testing.assert_close(y[1, :12], mixer(x[1:, :12])[0], **TOL64)


def test_mixer_cross_with_context_mask():
    torch.manual_seed(10)
    mixer = build_homm().eval()
    x, ctx = torch.randn(B, 7, DIM, dtype=torch.float64), torch.randn(B, 11, DIM, dtype=torch.float64)
    ctx_mask = torch.ones(B, 11, dtype=torch.bool)
    ctx_mask[0, 8:] = False
    y = mixer(x, context=ctx, context_mask=ctx_mask)
    torch.testing.assert_close(y[:1], mixer(x[:1], context=ctx[:1, :8]), **TOL64)


def test_decoder_lm_trains_and_stays_causal():
    torch.manual_seed(11)
    model = DecoderLM(attention.make_config("homm", order=2, order_expand=2, dim_hidden=16),
                      vocab=17, dim=32, depth=2, max_len=40)
    assert isinstance(model.body.blocks[0].mixer, HoMM)
    tokens = torch.randint(0, 17, (2, 33))
    logits = model(tokens)
    assert logits.shape == (2, 33, 17)
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    tokens2 = tokens.clone()
    tokens2[:, 20] = (tokens2[:, 20] + 1) % 17
    model.eval()
    assert torch.equal(model(tokens)[:, :20], model(tokens2)[:, :20])


@pytest.mark.parametrize("field,value", [
    ("order", 0), ("order_expand", 0), ("dim_hidden", -1), ("order", 1.5), ("dropout", 2.0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"homm.{field}"):
        attention.make_config("homm", **{field: value})


def test_op_rejects_causal_cross():
    moments, select = inputs(t=9)
    with pytest.raises(ValueError, match="as many context tokens"):
        moment_mix(moments[:, :5], select, causal=True)
