"""Triton HoMM mixing (GELU, moments, running or global mean, sigmoid gates, fused) against the float64
PyTorch composition, on the CPU under TRITON_INTERPRET=1: output and both gradients at odd sizes, orders
1 to 4, causal (one and several segments) and not (cross, S != T), key masks with padded stretches, the
backend dispatch of the op and the mixer. Kernel outputs start as NaN, so an element the kernels skip
fails."""

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
from attention.homm import homm_mix  # noqa: E402
from attention.homm import kernel as homm_kernel  # noqa: E402
from attention.homm.kernel import MomentTiles, homm_mix_triton  # noqa: E402

skip_unless_interpreted(homm_kernel._moment_mix_kernel)


def run_case(b, t, s, e, order, causal, dtype, masked=False, pad=None, segments=None):
    """(out, errors, grads): the kernel against the float64 PyTorch path on the same (rounded) inputs."""
    gen = torch.Generator().manual_seed(t * 100 + s + e * 7 + order)
    f = order * e
    hidden = torch.randn(b, s, f, generator=gen).to(dtype).requires_grad_()
    select = torch.randn(b, t, f, generator=gen).to(dtype).requires_grad_()
    mask = None
    if masked or pad:
        mask = torch.rand(b, s, generator=gen) > 0.25
        if pad:
            mask[0, pad[0]:pad[1]] = False
    ref_in = [x.detach().double().requires_grad_() for x in (hidden, select)]
    ref = homm_mix(*ref_in, order, causal=causal, key_mask=mask, backend="reference")
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(grad)
    out = homm_mix_triton(hidden, select, order, causal=causal, key_mask=mask,
                          tiles=MomentTiles(16, 16, 4, segments))
    assert out.dtype == dtype and out.shape == (b, t, f)
    got = torch.autograd.grad(out, (hidden, select), grad.to(dtype))
    errs = {"out": rel(out, ref), "dhidden": rel(got[0], ref_in[0].grad), "dselect": rel(got[1], ref_in[1].grad)}
    return out, errs, got


def check(errs: dict[str, float], dtype: torch.dtype) -> None:
    tol_out, tol_grad = TOL[dtype]
    assert errs["out"] < tol_out, errs
    assert errs["dhidden"] < tol_grad and errs["dselect"] < tol_grad, errs


# (b, t, s, e, order, causal), plus options; E = 13 and T = 37 fit no tile (16)
CASES = {
    "causal order 1": dict(b=2, t=37, s=37, e=13, order=1, causal=True),
    "causal order 2, masked, 3 segments": dict(b=2, t=37, s=37, e=13, order=2, causal=True, masked=True,
                                               segments=3),
    "causal order 3, leading padding, 2 segments": dict(b=2, t=37, s=37, e=13, order=3, causal=True,
                                                        pad=(0, 20), segments=2),
    "causal order 4, E 20": dict(b=1, t=37, s=37, e=20, order=4, causal=True, masked=True),
    "cross order 2, S != T, masked, 3 segments": dict(b=2, t=21, s=37, e=13, order=2, causal=False, masked=True,
                                                      segments=3),
    "non-causal order 3, batch 0 all padded": dict(b=2, t=37, s=37, e=13, order=3, causal=False, pad=(0, 37)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference_fp32(case):
    _, errs, _ = run_case(**CASES[case], dtype=torch.float32)
    check(errs, torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_kernel_matches_reference_fp16(causal):
    _, errs, _ = run_case(2, 37, 37, 13, 2, causal, torch.float16, masked=True, segments=2)
    check(errs, torch.float16)


def test_query_with_no_real_token_gets_zero_and_padded_tokens_no_gradient():
    out, _, (d_hidden, _) = run_case(**CASES["causal order 3, leading padding, 2 segments"], dtype=torch.float32)
    assert torch.equal(out[0, :20], torch.zeros_like(out[0, :20]))
    assert torch.equal(d_hidden[0, :20], torch.zeros_like(d_hidden[0, :20]))
    assert out[0, 20:].abs().sum() > 0


def test_backend_dispatch():
    gen = torch.Generator().manual_seed(9)
    hidden, select = torch.randn(2, 37, 26, generator=gen), torch.randn(2, 37, 26, generator=gen)
    via_dispatch = homm_mix(hidden, select, 2, causal=True, backend="triton")
    torch.testing.assert_close(via_dispatch, homm_mix(hidden, select, 2, causal=True, backend="reference"),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(homm_mix(hidden, select, 2, causal=True, backend="auto"),  # CPU: the PyTorch path
                       homm_mix(hidden, select, 2, causal=True, backend="reference"))
    wide = torch.randn(1, 5, 10, generator=gen)
    with pytest.raises(ValueError, match="order: the Triton kernel takes 1 to 4"):
        homm_mix(wide, wide, 5, backend="triton")
    with pytest.raises(ConfigError, match="backend: got 'cuda'"):
        homm_mix(hidden, select, 2, backend="cuda")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "cross"])
def test_mixer_backends_agree_forward_and_backward(causal):
    torch.manual_seed(0)
    x = torch.randn(2, 21, 32)
    mask = torch.rand(2, 21, generator=torch.Generator().manual_seed(1)) > 0.3
    kwargs = {"mask": mask} if causal else {"context": torch.randn(2, 30, 32), "context_mask": torch.ones(2, 30) > 0}
    assert_backends_agree("homm", {"order": 2, "dim_hidden": 8, "causal": causal}, x, out_rtol=1e-4, **kwargs)


def test_bad_backend_is_a_config_error_naming_field_and_choices():
    with pytest.raises(ConfigError, match=r"homm\.backend: got 'cuda', allowed: 'auto', 'reference', 'triton'"):
        attention.make_config("homm", backend="cuda")
    assert attention.make_config("homm").backend == "auto"


def test_rejects_bad_inputs():
    x = torch.randn(1, 9, 12)
    with pytest.raises(ValueError, match="as many context tokens as queries"):
        homm_mix_triton(x[:, :5], x, 2, causal=True)
    with pytest.raises(ValueError, match="multiple of order"):
        homm_mix_triton(x[..., :10], x[..., :10], 4)
    with pytest.raises(ValueError, match="key_mask"):
        homm_mix_triton(x, x, 2, key_mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        homm_mix_triton(x.double(), x.double(), 2)
    with pytest.raises(ValueError, match="power of two"):
        MomentTiles(block_t=8)
