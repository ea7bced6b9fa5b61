"""Triton coordinate descent (rows kernel and fused attention) against the float64 references, on the
CPU under TRITON_INTERPRET=1: outputs, every gradient, masks, per-row k, fully masked rows, rows split
across programs, the unmasked-tile and factored-backward paths. Kernel outputs start as NaN."""

from __future__ import annotations

import pytest
import torch  # (imports no triton)

# before anything imports triton: it sets TRITON_INTERPRET (poisoned_outputs is an autouse fixture)
from tests.attention.triton_interpreter import TOL, poisoned_outputs, rel, skip_unless_interpreted  # noqa: F401

triton = pytest.importorskip("triton")

from attention.coor_descent import kernel_attention, kernel_rows  # noqa: E402
from attention.coor_descent.kernel import coor_descent_attention_triton, coor_descent_triton  # noqa: E402
from attention.coor_descent.ops import coor_descent, coor_descent_attention  # noqa: E402
from attention.coor_descent.reference import coor_descent_attention_reference, coor_descent_reference  # noqa: E402

skip_unless_interpreted(kernel_rows._forward_kernel)


def run_rows(rows, n, k, n_iters, eps, dtype, eps_init=None, eps_decay=1.0, masked=False, per_row_k=False,
             **kernel_kw):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    s = torch.randn(rows, n, generator=gen).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(rows, n, generator=gen) > 0.3
        mask[0] = False  # a row with no candidate: zeros, zero gradient
    k_ref = (torch.rand(rows, generator=gen, dtype=torch.float64) * 6 + 1).requires_grad_() if per_row_k else k
    s64 = s.double().requires_grad_()
    y_ref = coor_descent_reference(s64, k_ref, n_iters, eps, eps_init, eps_decay, mask)
    grad = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    y_ref.backward(grad)
    s_in = s.clone().requires_grad_()
    k_in = k_ref.detach().float().requires_grad_() if per_row_k else k
    y = coor_descent_triton(s_in, k_in, n_iters, eps, eps_init, eps_decay, mask, **kernel_kw)
    y.backward(grad.to(dtype))
    errs = {"y": rel(y, y_ref), "ds": rel(s_in.grad, s64.grad)}
    if per_row_k:
        errs["dk"] = rel(k_in.grad, k_ref.grad)
    return y, errs


ROW_CASES = {
    "one program per row": dict(rows=3, n=37, k=4, n_iters=5, eps=0.5),
    "rows split over 3 programs": dict(rows=3, n=37, k=4, n_iters=6, eps=0.2, block=16, chunk_len=16),
    "masks, eps decay, split": dict(rows=3, n=45, k=5, n_iters=6, eps=0.1, eps_init=1.0, eps_decay=0.7,
                                    masked=True, block=16, chunk_len=16),
    "per-row k with gradient": dict(rows=4, n=29, k=None, n_iters=6, eps=0.3, per_row_k=True, block=16,
                                    chunk_len=16),
    "one iteration": dict(rows=2, n=19, k=3, n_iters=1, eps=0.3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(ROW_CASES), ids=list(ROW_CASES))
def test_rows_kernel_matches_reference(case, dtype):
    _, errs = run_rows(**ROW_CASES[case], dtype=dtype)
    tol_out, tol_grad = TOL[dtype]
    assert errs["y"] < tol_out, errs
    assert all(e < tol_grad for name, e in errs.items() if name != "y"), errs


def test_rows_fully_masked_row_is_zero():
    y, _ = run_rows(rows=3, n=45, k=5, n_iters=4, eps=0.2, dtype=torch.float32, masked=True, block=16,
                    chunk_len=16)
    assert torch.equal(y[0], torch.zeros_like(y[0]))


def test_rows_implicit_backward_matches_once_converged():
    """Implicit differentiation at the fixed point is the unrolled gradient once the iterations have
    converged (many iterations, moderate eps); it is an approximation otherwise (see the benchmark)."""
    _, errs = run_rows(rows=2, n=37, k=4, n_iters=40, eps=0.3, dtype=torch.float32, block=16, chunk_len=16,
                       implicit_backward=True)
    assert errs["y"] < 2e-5 and errs["ds"] < 1e-4, errs


def test_rows_plan_splits_long_rows_and_has_no_cap(monkeypatch):
    monkeypatch.setattr(kernel_rows, "_num_sms", lambda device: 132)  # an H100's multiprocessors
    dev = torch.device("cpu")
    block, chunk_len, mode = kernel_rows.forward_plan(16, 32768, dev, None, None, None)
    assert mode == kernel_rows.COOPERATIVE and 16 * triton.cdiv(32768, chunk_len) <= 132
    block, chunk_len, mode = kernel_rows.forward_plan(1, 2**20 + 7, dev, None, None, None)
    assert mode == kernel_rows.COOPERATIVE and 100 <= triton.cdiv(2**20 + 7, chunk_len) <= 132
    assert kernel_rows.forward_plan(4096, 1000, dev, None, None, None)[2] == kernel_rows.SINGLE
    assert kernel_rows.forward_plan(16, 32768, dev, None, None, False)[2] == kernel_rows.PER_ITERATION


def test_ops_dispatch_runs_the_kernel():
    s = torch.randn(2, 23, dtype=torch.float32)
    y_op = coor_descent(s, 3, 4, 0.3, backend="triton")
    y_kernel = coor_descent_triton(s, 3, 4, 0.3)
    assert torch.equal(y_op, y_kernel)
    q, k, v = (torch.randn(1, 9, 1, 12) for _ in range(3))
    args = dict(topk=3, n_iters=3, eps=0.3, causal=True)
    assert torch.equal(coor_descent_attention(q, k, v, backend="triton", **args),
                       coor_descent_attention_triton(q, k, v, **args))


def run_attention(b, t, s, h, d, topk, n_iters, eps, dtype, causal=False, key_mask=False, tiles=None,
                  **kw):
    gen = torch.Generator().manual_seed(t * 100 + s)
    q, k, v = (torch.randn(b, n, h, d, generator=gen).to(dtype) for n in (t, s, s))
    km = None
    if key_mask:
        km = torch.rand(b, s, generator=gen) > 0.3
        km[0] = False  # every query of batch 0 sees no key: zeros
    args = dict(topk=topk, n_iters=n_iters, eps=eps, causal=causal, key_mask=km, **kw)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    out_ref = coor_descent_attention_reference(*ref_in, **args)
    grad = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64)
    out_ref.backward(grad)
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    out = coor_descent_attention_triton(*ins, tiles=tiles, **args)
    out.backward(grad.to(dtype))
    errs = {"out": rel(out, out_ref)}
    errs.update({f"d{name}": rel(x.grad, r.grad) for name, x, r in zip("qkv", ins, ref_in)})
    return out, errs


ATTENTION_CASES = {
    "plain": dict(b=1, t=21, s=21, h=2, d=60, topk=5, n_iters=4, eps=0.3),
    "causal, fewer queries than keys": dict(b=2, t=21, s=33, h=1, d=12, topk=5, n_iters=4, eps=0.3,
                                            causal=True),
    "causal, key mask, rows with no key": dict(b=2, t=33, s=21, h=1, d=12, topk=5, n_iters=4, eps=0.3,
                                               causal=True, key_mask=True),
    "unmasked full tiles": dict(b=1, t=40, s=48, h=2, d=16, topk=5, n_iters=4, eps=0.3, causal=True),
    "eps decay to the floor": dict(b=1, t=50, s=64, h=1, d=16, topk=7, n_iters=8, eps=0.2, eps_init=1.0,
                                   eps_decay=0.5, causal=True),
    "backward without the factored sum": dict(b=1, t=23, s=32, h=1, d=16, topk=5, n_iters=5, eps=0.2,
                                              key_mask=True, tiles={"exp_limit": -1e30}),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=list(ATTENTION_CASES))
def test_attention_kernel_matches_reference_fp32(case):
    _, errs = run_attention(**ATTENTION_CASES[case], dtype=torch.float32)
    tol_out, tol_grad = TOL[torch.float32]
    assert errs["out"] < tol_out, errs
    assert all(e < tol_grad for name, e in errs.items() if name != "out"), errs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_kernel_matches_reference_fp16(causal):
    _, errs = run_attention(1, 21, 32, 2, 16, 5, 4, 0.3, torch.float16, causal=causal)
    tol_out, tol_grad = TOL[torch.float16]
    assert errs["out"] < tol_out, errs
    assert all(e < tol_grad for name, e in errs.items() if name != "out"), errs


def test_attention_query_without_keys_is_zero():
    out, _ = run_attention(2, 33, 21, 1, 12, 5, 3, 0.3, torch.float32, causal=True, key_mask=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # batch 0: every key masked
    assert torch.equal(out[1, :12], torch.zeros_like(out[1, :12]))  # causal: query i < T - S sees no key


def test_attention_rejects_bad_arguments():
    q = torch.randn(1, 5, 1, 8)
    with pytest.raises(ValueError, match="scale"):
        coor_descent_attention_triton(q, q, q, topk=2, n_iters=2, eps=0.1, scale=-1.0)
    with pytest.raises(TypeError, match="dtypes"):
        coor_descent_attention_triton(q, q.half(), q, topk=2, n_iters=2, eps=0.1)
    with pytest.raises(ValueError, match="key_mask"):
        coor_descent_attention_triton(q, q, q, topk=2, n_iters=2, eps=0.1,
                                      key_mask=torch.ones(1, 4, dtype=torch.bool))
    assert kernel_attention.attention_config(torch.float32, 60, True)["BLOCK_D"] == 64
