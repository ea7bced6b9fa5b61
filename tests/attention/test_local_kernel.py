"""Triton local attention against the float64 dense reference, on the CPU under TRITON_INTERPRET=1:
output and the three gradients at odd sizes, causal and not, look 0/1/2 both ways, windows smaller
than, equal to, not dividing and larger than T and the tiles, key masks with a fully padded band,
strided inputs, autocast, and the backend dispatch. Kernel outputs (and its LSE / delta buffers)
start as NaN, so an element the kernels skip fails."""

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
from attention.local import kernel, local_attention, local_attention_reference  # noqa: E402
from attention.local.kernel import LocalTiles, Tile, local_attention_triton  # noqa: E402

skip_unless_interpreted(kernel._local_fwd_kernel)


def padded_band_mask(b: int, t: int, start: int, stop: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) random padding, and batch 0 padded on [start, stop): queries whose whole band lies inside
    it see no key (zero output, zero gradient)."""
    mask = torch.rand(b, t, generator=gen) > 0.25
    mask[0, start:stop] = False
    return mask


def run_case(b, t, h, d, window, look_backward, look_forward, causal, dtype, pad=None, tiles=None, layout="bthd"):
    """(out, errors, inputs, reference inputs). layout 'fused': q, k, v are slices of one (B, T, 3, H, D)
    tensor (strided rows, as a fused projection gives), and v's head dim has stride H (copied)."""
    gen = torch.Generator().manual_seed(t * 1000 + window * 10 + look_backward + 3 * look_forward)
    key_mask = padded_band_mask(b, t, *pad, gen) if pad else None
    kw = dict(window_size=window, look_backward=look_backward, look_forward=look_forward, causal=causal,
              key_mask=key_mask)
    if layout == "fused":
        qkv = torch.randn(b, t, 3, h, d, generator=gen).to(dtype).requires_grad_()
        v_dh = torch.randn(b, t, d, h, generator=gen).to(dtype).requires_grad_()  # (B, T, D, H)
        ins = [qkv[:, :, 0], qkv[:, :, 1], v_dh.transpose(-1, -2)]  # views, (B, T, H, D)
        assert not ins[0].is_contiguous() and ins[2].stride(-1) == h
        leaves = [qkv, v_dh]
    else:
        ins = [torch.randn(b, t, h, d, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
        leaves = ins
    ref_in = [x.detach().double().requires_grad_() for x in ins]
    out_ref = local_attention_reference(*ref_in, **kw)
    grad = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64)
    out_ref.backward(grad)
    out = local_attention_triton(*ins, tiles=tiles, **kw)
    assert out.dtype == dtype and out.shape == (b, t, h, d)
    got = torch.autograd.grad(out, ins, grad.to(dtype))
    assert all(x.grad is None for x in leaves)
    errs = {"out": rel(out, out_ref)}
    errs.update({f"d{name}": rel(g, r.grad) for name, g, r in zip("qkv", got, ref_in)})
    return out, errs, got, ref_in


def check(errs: dict[str, float], dtype: torch.dtype) -> None:
    tol_out, tol_grad = TOL[dtype]
    assert errs["out"] < tol_out, errs
    assert all(e < tol_grad for name, e in errs.items() if name != "out"), errs


T16 = LocalTiles(Tile(16, 16), Tile(16, 16), Tile(16, 16))
MIXED = LocalTiles(Tile(32, 16), Tile(16, 32), Tile(32, 16))  # BLOCK_M != BLOCK_N in every kernel

# (b, t, h, d, window, look_backward, look_forward, causal), plus options
CASES = {
    "W5 look 1/1, D60": dict(b=2, t=37, h=2, d=60, window=5, look_backward=1, look_forward=1, causal=False),
    "W16 causal 1/0, H3, T100": dict(b=2, t=100, h=3, d=16, window=16, look_backward=1, look_forward=0,
                                     causal=True),
    "W64 look 2/2, T100, mixed tiles": dict(b=1, t=100, h=2, d=16, window=64, look_backward=2, look_forward=2,
                                            causal=False, tiles=MIXED),
    "W100 > T": dict(b=2, t=37, h=2, d=16, window=100, look_backward=1, look_forward=1, causal=False),
    "W5 look 0/2": dict(b=2, t=37, h=2, d=16, window=5, look_backward=0, look_forward=2, causal=False),
    "W5 look 2/0": dict(b=2, t=37, h=2, d=16, window=5, look_backward=2, look_forward=0, causal=False),
    "W16 causal 0/0": dict(b=2, t=37, h=2, d=16, window=16, look_backward=0, look_forward=0, causal=True),
    "W5 causal 2/0, padded band": dict(b=2, t=37, h=2, d=60, window=5, look_backward=2, look_forward=0,
                                       causal=True, pad=(10, 25)),
    "W16 look 1/1, padded band": dict(b=2, t=100, h=2, d=16, window=16, look_backward=1, look_forward=1,
                                      causal=False, pad=(16, 64), tiles=MIXED),
    "fused qkv views, W5 causal": dict(b=2, t=37, h=2, d=16, window=5, look_backward=1, look_forward=0,
                                       causal=True, layout="fused"),
    "W1 look 2/2": dict(b=1, t=37, h=1, d=16, window=1, look_backward=2, look_forward=2, causal=False),
    "look 5/0 past the start, causal": dict(b=1, t=37, h=2, d=16, window=16, look_backward=5, look_forward=0,
                                            causal=True),
    "D128, batch 0 all padded": dict(b=2, t=37, h=1, d=128, window=16, look_backward=1, look_forward=1,
                                     causal=False, pad=(0, 37)),
    "GPU default tiles (32x32)": dict(b=1, t=100, h=2, d=60, window=64, look_backward=1, look_forward=1,
                                      causal=False, tiles=kernel.default_tiles(torch.float32, 60, False)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference_fp32(case):
    _, errs, _, _ = run_case(**CASES[case], dtype=torch.float32)
    check(errs, torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["look 1/1", "causal 1/0"])
def test_kernel_matches_reference_fp16(causal):
    _, errs, _, _ = run_case(2, 37, 2, 60, 5, 1, 0 if causal else 1, causal, torch.float16, pad=(10, 20),
                             tiles=MIXED)
    check(errs, torch.float16)


def test_gpu_default_tiles_fp16():
    tiles = kernel.default_tiles(torch.float16, 16, False)
    assert tiles.fwd == Tile(64, 64, 4)
    _, errs, _, _ = run_case(1, 100, 2, 16, 64, 1, 0, True, torch.float16, pad=(70, 80), tiles=tiles)
    check(errs, torch.float16)


def test_query_with_no_visible_key_has_zero_output_and_gradients():
    # W16, look 1/1, batch 0 padded on [16, 64): windows 1..3 pad their own keys, and window 2
    # (queries 32..47) sees windows 1..3 only: no key at all.
    out, _, (dq, dk, dv), _ = run_case(**CASES["W16 look 1/1, padded band"], dtype=torch.float32)
    assert torch.equal(out[0, 32:48], torch.zeros_like(out[0, 32:48]))
    assert torch.equal(dq[0, 32:48], torch.zeros_like(dq[0, 32:48]))
    assert torch.equal(dk[0, 16:64], torch.zeros_like(dk[0, 16:64]))  # padded keys get no gradient
    assert torch.equal(dv[0, 16:64], torch.zeros_like(dv[0, 16:64]))
    assert out[0, :32].abs().sum() > 0 and out[0, 48:].abs().sum() > 0


def test_autocast_runs_in_its_dtype_and_returns_gradients_in_the_inputs():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=gen).requires_grad_() for _ in range(3))
    kw = dict(window_size=5, look_backward=1, look_forward=1)
    with torch.autocast("cpu", dtype=torch.float16):
        out = local_attention_triton(q, k, v, tiles=T16, **kw)
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == torch.float32 for g in grads)
    ref_in = [x.detach().half().double().requires_grad_() for x in (q, k, v)]  # what autocast computes on
    ref = local_attention_reference(*ref_in, **kw)
    ref.sum().backward()
    assert rel(out, ref) < TOL[torch.float16][0]
    assert all(rel(g, r.grad) < TOL[torch.float16][1] for g, r in zip(grads, ref_in))


def test_backend_dispatch():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 37, 2, 16, generator=gen) for _ in range(3))
    kw = dict(window_size=5, look_backward=1, look_forward=1, key_mask=padded_band_mask(2, 37, 10, 20, gen))
    via_dispatch = local_attention(q, k, v, backend="triton", **kw)
    assert torch.equal(via_dispatch, local_attention_triton(q, k, v, **kw))
    torch.testing.assert_close(via_dispatch, local_attention(q, k, v, backend="reference", **kw), rtol=0,
                               atol=1e-5)
    assert torch.equal(local_attention(q, k, v, backend="auto", **kw),  # CPU tensors: the PyTorch path
                       local_attention(q, k, v, backend="reference", **kw))
    with pytest.raises(ConfigError, match="backend: got 'cuda'"):
        local_attention(q, k, v, backend="cuda", **kw)


def test_mixer_backends_agree_forward_and_backward():
    torch.manual_seed(0)
    mask = padded_band_mask(2, 37, 10, 20, torch.Generator().manual_seed(7))
    assert_backends_agree("local", {"window_size": 5, "heads": 2}, torch.randn(2, 37, 32), mask=mask)


def test_bad_backend_is_a_config_error_naming_field_and_choices():
    with pytest.raises(ConfigError, match=r"local\.backend: got 'cuda', allowed: 'auto', 'reference', 'triton'"):
        attention.make_config("local", backend="cuda")
    assert attention.make_config("local").backend == "auto"


def test_rejects_bad_inputs():
    q = torch.randn(1, 9, 1, 16)
    with pytest.raises(ValueError, match="self-attention"):
        local_attention_triton(q, q[:, :5], q, window_size=4)
    with pytest.raises(ValueError, match="key_mask"):
        local_attention_triton(q, q, q, window_size=4, key_mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="D <= 128"):
        x = torch.randn(1, 9, 1, 130)
        local_attention_triton(x, x, x, window_size=4)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        local_attention_triton(q.double(), q.double(), q.double(), window_size=4)
    with pytest.raises(ValueError, match="power of two"):
        Tile(block_m=8)
