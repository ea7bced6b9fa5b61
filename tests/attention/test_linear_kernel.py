"""Triton linear attention against the float64 quadratic reference, on the CPU under TRITON_INTERPRET=1:
output and the three gradients at odd sizes, causal and not (cross attention, S != T), elu / relu /
identity, key masks with padded stretches, one and several segments per sequence, strided inputs,
autocast, the decoding step, and the backend dispatch of the op and the mixer. Kernel outputs (and the
den / state buffers) start as NaN, so an element the kernels skip fails."""

from __future__ import annotations

import pytest
import torch  # (imports no triton)

# before anything imports triton: it sets TRITON_INTERPRET (poisoned_outputs is an autouse fixture)
from tests.attention.triton_interpreter import (  # noqa: F401
    TOL,
    assert_backends_agree,
    poisoned_outputs,
    rel,
    skip_unless_interpreted,
)

triton = pytest.importorskip("triton")

import attention  # noqa: E402
from attention.config import ConfigError  # noqa: E402
from attention.linear import (  # noqa: E402
    chunked,
    init_linear_state,
    kernel,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)
from attention.linear.kernel import LinearTiles, Tile, linear_attention_triton  # noqa: E402

skip_unless_interpreted(kernel._causal_fwd_kernel)

T16 = Tile(16, 4)


def tiles(segments=None, chunk=16):
    t = Tile(chunk, 4)
    return LinearTiles(t, t, t, segments)


def key_mask(b: int, s: int, gen: torch.Generator, pad: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, S) random padding; batch 0 also padded on [pad[0], pad[1]) (pad[0] = 0: leading padding, so the
    first queries of a causal row see no key)."""
    mask = torch.rand(b, s, generator=gen) > 0.25
    if pad:
        mask[0, pad[0]:pad[1]] = False
    return mask


def run_case(b, t, s, h, d, dv, causal, feature_map, dtype, pad=None, masked=False, segments=None, layout="bthd",
             chunk=16):
    """(out, errors, grads): the kernel against the float64 reference on the same (rounded) inputs.
    layout 'fused': q, k, v are slices of one (B, T, 3, H, D) tensor (strided rows, as a fused projection
    gives), and v's head dim has stride H (copied by the wrapper)."""
    gen = torch.Generator().manual_seed(t * 100 + s + d)
    mask = key_mask(b, s, gen, pad) if (masked or pad) else None
    if layout == "fused":
        qkv = torch.randn(b, t, 3, h, d, generator=gen).to(dtype).requires_grad_()
        v_dh = torch.randn(b, t, dv, h, generator=gen).to(dtype).requires_grad_()
        ins = [qkv[:, :, 0], qkv[:, :, 1], v_dh.transpose(-1, -2)]  # views, (B, T, H, D)
        assert not ins[0].is_contiguous() and ins[2].stride(-1) == h
    else:
        shapes = [(b, t, h, d), (b, s, h, d), (b, s, h, dv)]
        ins = [torch.randn(sh, generator=gen) for sh in shapes]
        if feature_map == "identity":  # the caller's own non-negative features
            ins[0], ins[1] = ins[0].abs(), ins[1].abs()
        ins = [x.to(dtype).requires_grad_() for x in ins]
    kw = dict(causal=causal, feature_map=feature_map, key_mask=mask)
    ref_in = [x.detach().double().requires_grad_() for x in ins]
    out_ref = linear_attention_reference(*ref_in, **kw)
    grad = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64)
    out_ref.backward(grad)
    out = linear_attention_triton(*ins, tiles=tiles(segments, chunk), **kw)
    assert out.dtype == dtype and out.shape == (b, t, h, dv)
    got = torch.autograd.grad(out, ins, grad.to(dtype))
    errs = {"out": rel(out, out_ref)}
    errs.update({f"d{name}": rel(g, r.grad) for name, g, r in zip("qkv", got, ref_in)})
    return out, errs, got


def check(errs: dict[str, float], dtype: torch.dtype) -> None:
    tol_out, tol_grad = TOL[dtype]
    assert errs["out"] < tol_out, errs
    assert all(e < tol_grad for name, e in errs.items() if name != "out"), errs


# (b, t, s, h, d, dv, causal, feature_map), plus options; T = 63 is no multiple of the chunk (16)
CASES = {
    "causal elu, D60 Dv44": dict(b=2, t=63, s=63, h=2, d=60, dv=44, causal=True, feature_map="elu"),
    "causal elu, 3 segments, masked": dict(b=2, t=63, s=63, h=2, d=12, dv=20, causal=True, feature_map="elu",
                                           masked=True, segments=3),
    "causal relu, 4 segments, leading padding": dict(b=2, t=63, s=63, h=2, d=12, dv=20, causal=True,
                                                     feature_map="relu", pad=(0, 20), segments=4),
    "causal identity, 2 segments": dict(b=1, t=63, s=63, h=3, d=16, dv=16, causal=True, feature_map="identity",
                                        segments=2),
    "causal elu, one chunk (T < C)": dict(b=2, t=9, s=9, h=2, d=12, dv=12, causal=True, feature_map="elu",
                                          masked=True),
    "causal elu, chunk 32, 2 segments": dict(b=1, t=63, s=63, h=2, d=16, dv=16, causal=True, feature_map="elu",
                                             chunk=32, segments=2, masked=True),
    "cross elu, S != T, masked, 3 segments": dict(b=2, t=37, s=50, h=2, d=60, dv=44, causal=False,
                                                  feature_map="elu", masked=True, segments=3),
    "non-causal relu, self": dict(b=2, t=63, s=63, h=2, d=12, dv=20, causal=False, feature_map="relu"),
    "non-causal identity, all keys of batch 0 padded": dict(b=2, t=20, s=37, h=1, d=16, dv=16, causal=False,
                                                            feature_map="identity", pad=(0, 37)),
    "fused qkv views, causal elu": dict(b=2, t=37, s=37, h=2, d=16, dv=16, causal=True, feature_map="elu",
                                        layout="fused", segments=2),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference_fp32(case):
    _, errs, _ = run_case(**CASES[case], dtype=torch.float32)
    check(errs, torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_kernel_matches_reference_fp16(causal):
    _, errs, _ = run_case(2, 63, 63 if causal else 40, 2, 60, 44, causal, "elu", torch.float16, masked=True,
                          segments=3)
    check(errs, torch.float16)


def test_query_with_no_visible_key_has_zero_output_and_gradients():
    # causal, batch 0 padded on [0, 20): queries 0..19 see no real key; padded keys get no gradient
    out, _, (dq, dk, dv) = run_case(**CASES["causal relu, 4 segments, leading padding"], dtype=torch.float32)
    assert torch.equal(out[0, :20], torch.zeros_like(out[0, :20]))
    assert torch.equal(dq[0, :20], torch.zeros_like(dq[0, :20]))
    assert torch.equal(dk[0, :20], torch.zeros_like(dk[0, :20]))
    assert torch.equal(dv[0, :20], torch.zeros_like(dv[0, :20]))
    assert out[0, 20:].abs().sum() > 0


def test_causal_output_does_not_depend_on_later_tokens():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen) for _ in range(3))
    base = linear_attention_triton(q, k, v, causal=True, tiles=tiles(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, 25:], v2[:, 25:] = torch.randn(1, 15, 2, 16, generator=gen), torch.randn(1, 15, 2, 16, generator=gen)
    changed = linear_attention_triton(q, k2, v2, causal=True, tiles=tiles(3))
    assert torch.equal(base[:, :25], changed[:, :25])
    assert not torch.equal(base[:, 25:], changed[:, 25:])


def test_autocast_runs_in_its_dtype_and_returns_gradients_in_the_inputs():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=gen).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.float16):
        out = linear_attention_triton(q, k, v, causal=True, tiles=tiles(2))
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == torch.float32 for g in grads)
    ref_in = [x.detach().half().double().requires_grad_() for x in (q, k, v)]  # what autocast computes on
    ref = linear_attention_reference(*ref_in, causal=True)
    ref.sum().backward()
    assert rel(out, ref) < TOL[torch.float16][0]
    assert all(rel(g, r.grad) < TOL[torch.float16][1] for g, r in zip(grads, ref_in))


@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
def test_decoding_step_kernel_matches_the_pytorch_step(feature_map):
    gen = torch.Generator().manual_seed(6)
    b, h, d, dv = 2, 3, 12, 20
    state = init_linear_state(b, h, d, dv, performer=False)
    ref_state = state
    for _ in range(5):
        q_t, k_t, v_t = (torch.randn(b, h, n, generator=gen) for n in (d, d, dv))
        if feature_map == "identity":
            q_t, k_t = q_t.abs(), k_t.abs()
        out, state = linear_attention_step(q_t, k_t, v_t, state, feature_map=feature_map, backend="triton")
        ref, ref_state = chunked.linear_attention_step(q_t, k_t, v_t, ref_state, feature_map=feature_map)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.S, ref_state.S, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state.z, ref_state.z, rtol=1e-6, atol=1e-6)


def test_backend_dispatch():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 37, 2, 16, generator=gen) for _ in range(3))
    kw = dict(causal=True, key_mask=key_mask(2, 37, gen, (5, 15)))
    via_dispatch = linear_attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(via_dispatch, linear_attention(q, k, v, backend="reference", **kw), rtol=0, atol=1e-5)
    assert torch.equal(linear_attention(q, k, v, backend="auto", **kw),  # CPU tensors: the PyTorch path
                       linear_attention(q, k, v, backend="reference", **kw))
    projection = torch.randn(20, 16)
    with pytest.raises(ValueError, match="Performer features run on the PyTorch path"):
        linear_attention(q, k, v, feature_map="performer", projection=projection, backend="triton")
    with pytest.raises(ConfigError, match="backend: got 'cuda'"):
        linear_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_mixer_backends_agree_forward_and_backward(causal):
    torch.manual_seed(0)
    mask = key_mask(2, 37, torch.Generator().manual_seed(8), (3, 9))
    assert_backends_agree("linear", {"heads": 2, "causal": causal}, torch.randn(2, 37, 32), mask=mask)


def test_bad_backend_is_a_config_error_naming_field_and_choices():
    with pytest.raises(ConfigError, match=r"linear\.backend: got 'cuda', allowed: 'auto', 'reference', 'triton'"):
        attention.make_config("linear", backend="cuda")
    assert attention.make_config("linear").backend == "auto"


def test_rejects_bad_inputs():
    q = torch.randn(1, 9, 1, 16)
    with pytest.raises(ValueError, match="as many keys as queries"):
        linear_attention_triton(q, q[:, :5], q[:, :5], causal=True)
    with pytest.raises(ValueError, match="key_mask"):
        linear_attention_triton(q, q, q, key_mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="D, Dv <= 128"):
        x = torch.randn(1, 9, 1, 130)
        linear_attention_triton(x, x, x)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        linear_attention_triton(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="power of two"):
        Tile(chunk=8)
    with pytest.raises(ValueError, match="one chunk size"):
        LinearTiles(Tile(16), Tile(16), Tile(32))
