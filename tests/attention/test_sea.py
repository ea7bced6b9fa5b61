"""SEA: every stage against its dense float64 reference (Performer cell mass, estimation target and losses,
grouped top-k + expansion, sparse attention and its gradients), k = T equals dense softmax, no future
leak, padding, the estimator learns through the injected loss, training memory linear in T, and the
Triton kernel against the PyTorch path (interpreter, in a subprocess)."""

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attention
from attention.config import ConfigError
from attention.linear.features import orthogonal_random_projection
from attention.models import DecoderLM
from attention.sea import SeaAttention, key_geometry, mask_to_dense, select_cells, sparse_attention_torch
from attention.sea import reference as ref
from attention.sea.estimator import compressed_attention, estimation_losses, performer_bin_mass, sample_rows
from attention.softmax import SoftmaxAttention
from attention.softmax.reference import softmax_attention_reference

B, T, H, D, P, M = 2, 63, 3, 20, 9, 16
TOL64 = {"atol": 1e-12, "rtol": 1e-12}
TOL32 = {"atol": 2e-5, "rtol": 2e-5}  # float32 op against float64: O(1) sums of a few hundred terms


def qkv(dtype=torch.float64, t=T, seed=0, dv=D):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, t, H, D, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(B, t, H, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding(t=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, t, generator=g) > 0.3
    mask[0, :5] = False  # leading padding: the first queries see no key at all when causal
    mask[1, -7:] = False
    return mask


CASES = [(c, m) for c in (False, True) for m in (False, True)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("causal, masked", CASES)
def test_performer_cell_mass_matches_dense_reference(causal, masked):
    mask = padding() if masked else None
    proj = orthogonal_random_projection(M, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = ref.performer_bin_mass_reference(*qkv()[:2], proj, P, causal=causal, key_mask=mask)
    for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
        q, k, _ = qkv(dtype)
        geo = key_geometry(B, T, T, causal, mask, P, q.device)
        for chunk in (500, 2**24):  # several query chunks, and one
            got = performer_bin_mass(q, k, geo, proj.to(dtype), chunk_elements=chunk)
            torch.testing.assert_close(got.double(), expected, **tol)
    seen = geo.visible > 0
    torch.testing.assert_close(got.sum(-1)[seen], torch.ones_like(got.sum(-1)[seen]), **TOL32)


@pytest.mark.parametrize("causal, masked", CASES)
def test_estimation_target_and_losses_match_dense_reference(causal, masked):
    mask = padding() if masked else None
    q, k, _ = qkv()
    geo = key_geometry(B, T, T, causal, mask, P, q.device)
    expected = ref.compressed_attention_reference(q, k, P, causal=causal, key_mask=mask)  # (B, T, H, P)
    rows = sample_rows(T, 0, q.device)
    torch.testing.assert_close(compressed_attention(q, k, geo, mask, rows), expected, **TOL64)
    some = sample_rows(T, 11, q.device, torch.Generator().manual_seed(0))
    torch.testing.assert_close(compressed_attention(q, k, geo, mask, some), expected[:, some], **TOL64)

    # KL(target || est) and MSE from the definitions, over rows that see a key.
    cells = ref._cells(ref._visible(q, k, causal, mask), P)[:, 0]  # (B, T, S): cell of each visible key
    nonempty = (cells[..., None] == torch.arange(P)).any(-2)  # (B, T, P)
    logits = torch.randn(B, T, H, P, dtype=torch.float64).masked_fill(~nonempty[:, :, None], float("-inf"))
    kl, mse = estimation_losses(logits, expected, rows, geo.visible)
    est = torch.softmax(logits, -1).nan_to_num(0.0)
    valid = (geo.visible > 0)[:, :, None].expand(-1, -1, H)
    kl_rows = torch.where(expected > 0, expected * (expected.clamp_min(1e-300).log() - est.clamp_min(1e-300).log()), 0)
    torch.testing.assert_close(kl, kl_rows.sum(-1)[valid].mean(), **TOL64)
    torch.testing.assert_close(mse, ((est - expected) ** 2).mean(-1)[valid].mean(), **TOL64)


# (P, k): cells of one key, cells wider than k (k keys evenly spaced), k = T, one cell
SELECTIONS = [(9, 7), (4, 5), (63, 2), (9, 63), (1, 63), (5, 2)]


@pytest.mark.parametrize("causal, masked", CASES)
@pytest.mark.parametrize("group", ["head", "query"])
def test_grouped_topk_and_expansion_match_reference(causal, masked, group):
    mask = padding() if masked else None
    for bins, k in SELECTIONS:
        geo = key_geometry(B, T, T, causal, mask, bins, torch.device("cpu"))
        est = torch.rand(B, T, H, bins, generator=torch.Generator().manual_seed(bins * 100 + k))
        for chunk in (64, 2**22):  # queries ranked in several chunks, and in one
            sparse = select_cells(est, geo, k, group, chunk_elements=chunk)
            dense = mask_to_dense(sparse, geo, H)
            expected = ref.select_reference(est, k, group, s=T, causal=causal, key_mask=mask)
            assert torch.equal(dense, expected), (bins, k, chunk)
        allowed = ref._visible(torch.zeros(B, T, 1, 1), torch.zeros(B, T, 1, 1), causal, mask)
        assert not (dense & ~allowed).any()  # never a future or padded key
        per_query = dense.sum(-1).float()  # (B, H, T)
        seen = geo.visible[:, None].expand_as(per_query)
        if group == "head":  # about k keys, never more than a cell over, each head keeps >= 1 key
            assert torch.all(per_query[seen > 0] >= 1)
            assert torch.all(per_query <= torch.minimum(seen.float(), torch.tensor(k + math.ceil(T / bins))))


@pytest.mark.parametrize("causal, masked", CASES)
def test_sparse_attention_and_gradients_match_reference(causal, masked):
    mask = padding() if masked else None
    geo = key_geometry(B, T, T, causal, mask, P, torch.device("cpu"))
    sparse = select_cells(torch.rand(B, T, H, P), geo, 7, "query")
    dense = mask_to_dense(sparse, geo, H)
    q64, k64, v64 = (x.requires_grad_() for x in qkv(dv=13))
    expected = ref.sparse_attention_reference(q64, k64, v64, dense)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad)
    for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
        q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q64, k64, v64))
        out, lse = sparse_attention_torch(q, k, v, sparse, geo)
        torch.testing.assert_close(out.double(), expected.detach(), **tol)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad.to(dtype)), expected_grads):
            torch.testing.assert_close(got.double(), want, **tol)
    if masked and causal:
        assert torch.all(out[0, :5] == 0)  # no visible key: zeros, not NaN


@pytest.mark.parametrize("causal, masked", CASES)
def test_k_equal_to_T_is_dense_softmax(causal, masked):
    mask = padding() if masked else None
    q, k, v = qkv()
    geo = key_geometry(B, T, T, causal, mask, P, q.device)
    for group in ("head", "query"):
        sparse = select_cells(torch.rand(B, T, H, P, dtype=torch.float64), geo, T, group)
        out, _ = sparse_attention_torch(q, k, v, sparse, geo)
        torch.testing.assert_close(out, softmax_attention_reference(q, k, v, causal=causal, key_mask=mask), **TOL64)
    # The whole mixer at k = T is the softmax mixer with the same projections.
    torch.set_default_dtype(torch.float64)
    try:
        sea = SeaAttention(attention.make_config("sea", k=T, predictor_length=P, heads=H, causal=causal), 24)
        soft = SoftmaxAttention(attention.make_config("softmax", heads=H, causal=causal, kernel="eager"), 24)
        soft.load_state_dict(sea.state_dict(), strict=False)
        x = torch.randn(B, T, 24)
        torch.testing.assert_close(sea(x, mask=mask), soft(x, mask=mask), **TOL64)
    finally:
        torch.set_default_dtype(torch.float32)


def _randomise_predictor(model):
    # The predictor's last layers start at zero; give them weights so the test covers the whole network.
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "predictor" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3


@pytest.mark.parametrize("group", ["head", "query"])
def test_no_future_leak_through_the_whole_model(group):
    cfg = attention.make_config("sea", k=6, predictor_length=8, nb_features=8, topk_group=group)
    model = DecoderLM(cfg, vocab=50, dim=24, depth=2, max_len=40)
    _randomise_predictor(model)
    model.train()  # the estimation loss path too
    tokens = torch.randint(0, 50, (2, 40))
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, 50, (2, 15))
    torch.manual_seed(0)
    a = model(tokens)
    torch.manual_seed(0)
    b = model(changed)
    torch.testing.assert_close(a[:, :25], b[:, :25], atol=0, rtol=0)
    assert not torch.allclose(a[:, 25:], b[:, 25:])
    # Gradient view: the loss at position 10 does not reach embeddings of later inputs.
    emb = model.tok(tokens).detach().requires_grad_()
    x = emb + model.pos(torch.arange(40))
    out = model.head(model.body(x))
    (grad,) = torch.autograd.grad(out[:, 10].sum(), emb)
    assert grad[:, 11:].abs().max() == 0 and grad[:, :11].abs().max() > 0


# Low precision against float64, relative L2 error of the output and of every gradient: 4 unit roundoffs.
TOL_LOW = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def _rel(got, want):
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("how", ["autocast", "weights"])
def test_low_precision_mixer_trains_and_matches_float64(dtype, how):
    """fp16 / bf16 under autocast (float32 weights, the training loops) and with low-precision weights
    (workloads.speed): the predictor's CNN once met a float32 map with bf16 weights and crashed. At
    k = T the mask is every key, so the output and every gradient (the estimator's through its
    injected loss) must equal the float64 mixer's up to the dtype's rounding."""
    cfg = attention.make_config("sea", k=T, predictor_length=P, nb_features=M, heads=H, causal=True)
    sea = SeaAttention(cfg, 24)
    _randomise_predictor(sea)
    sea.train()
    exact = copy.deepcopy(sea).double()
    mask = padding()
    x = torch.randn(B, T, 24, dtype=torch.float64)
    x64 = x.clone().requires_grad_()
    torch.manual_seed(1)  # the loss rows are sampled: the same rows in both runs
    want = exact(x64, mask)
    want.square().sum().backward()
    low = sea.to(dtype) if how == "weights" else sea
    x_low = x.to(dtype if how == "weights" else torch.float32).requires_grad_()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
        got = low(x_low, mask)
    got.float().square().sum().backward()
    assert got.dtype == dtype and "est_kl" in low.aux
    tol = TOL_LOW[dtype]
    assert _rel(got, want) < tol
    assert _rel(x_low.grad, x64.grad) < tol
    exact_params = dict(exact.named_parameters())
    for name, p in low.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        if "predictor" not in name:
            assert _rel(p.grad, exact_params[name].grad) < tol, name
    # The predictor's gradients as one vector: a softmax over cells is blind to a per-head shift, so
    # e.g. conv_out.bias has an exact gradient of 0 and only rounding left in low precision.
    got_est, want_est = (torch.cat([p.grad.double().flatten() for n, p in m.named_parameters() if "predictor" in n])
                         for m in (low, exact))
    assert _rel(got_est, want_est) < tol


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_speed_workload_runs_sea_in_low_precision(dtype):
    """The speed workload's block scope with bf16 / fp16 weights and inputs (it crashed in bf16)."""
    from workloads.common.report import LocalReporter
    from workloads.speed import build_task

    config = {"workload": "speed", "seed": 0,
              "attn": {"method": "sea", "causal": True, "k": 8, "predictor_length": 8, "heads": 2},
              "model": {"dim": 32, "depth": 2, "scope": "block"},
              "data": {"lengths": [24, 48], "warmup": 0, "repeats": 1, "dtype": dtype},
              "train": {"batch_size": 2}}
    task, _ = build_task(config)
    reporter = LocalReporter(quiet=True)
    last = task.run(reporter, torch.device("cpu"))
    assert [h["step"] for h in reporter.history] == [24, 48]
    assert all(h["perf/oom"] == 0 for h in reporter.history)
    assert last["perf/fwd_bwd_ms"] > 0 and last["perf/tokens_per_s"] > 0


def test_padding_is_ignored_by_real_positions():
    cfg = attention.make_config("sea", k=6, predictor_length=8, heads=2)
    mixer = SeaAttention(cfg, 16)
    _randomise_predictor(mixer)
    mask = padding(t=30)
    x = torch.randn(B, 30, 16)
    y = x.clone()
    y[~mask] = torch.randn(int((~mask).sum()), 16) * 5
    a, b = mixer(x, mask=mask), mixer(y, mask=mask)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-6, rtol=1e-6)
    assert torch.all(a[~mask] == 0)


def test_estimator_learns_from_the_injected_loss():
    """Only the predictor learns here (the task loss is zero): est_kl must fall."""
    torch.manual_seed(0)
    cfg = attention.make_config("sea", k=4, predictor_length=8, causal=True, loss_rows=0)
    mixer = SeaAttention(cfg, 32)
    opt = torch.optim.Adam(mixer.predictor.parameters(), lr=1e-2)
    x = torch.randn(2, 32, 32) * 2
    kls = []
    for _ in range(25):
        y = mixer(x)
        (y * 0).sum().backward()
        opt.step()
        opt.zero_grad()
        kls.append(float(mixer.aux["est_kl"]))
    assert kls[-1] < 0.7 * kls[0], kls
    assert 0 < float(mixer.aux["mask_density"]) <= 1


def _training_memory(model_fn, t):
    """(bytes autograd saves for backward, largest single tensor any op creates) for one training step."""
    saved, largest = {}, [0]

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    largest[0] = max(largest[0], o.numel() * o.element_size())
            return out

    def pack(x):
        saved[(x.data_ptr(), x.shape, x.dtype)] = x.numel() * x.element_size()
        return x

    torch.manual_seed(0)
    model = model_fn()
    x = torch.randn(1, t, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), Largest():
        model(x).square().mean().backward()
    return sum(saved.values()), largest[0]


def test_training_memory_grows_linearly_in_T():
    def sea():
        return SeaAttention(attention.make_config("sea", k=16, predictor_length=16, heads=2, causal=True,
                                                  loss_rows=16), 32)

    def dense():
        return SoftmaxAttention(attention.make_config("softmax", heads=2, causal=True, kernel="eager"), 32)

    (s1, l1), (s2, l2) = _training_memory(sea, 256), _training_memory(sea, 512)
    assert s2 / s1 < 2.3 and l2 / l1 < 2.3, (s1, s2, l1, l2)
    # The probe does see quadratic memory: dense softmax at the same lengths.
    (d1, m1), (d2, m2) = _training_memory(dense, 256), _training_memory(dense, 512)
    assert d2 / d1 > 3.0 and m2 / m1 > 3.5, (d1, d2, m1, m2)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"sea\.k: got 64 for sequences of 32"):
        DecoderLM(attention.make_config("sea", k=64), vocab=10, dim=16, depth=1, max_len=32)
    with pytest.raises(ConfigError, match=r"sea\.predictor_length"):
        DecoderLM(attention.make_config("sea", k=4, predictor_length=64), vocab=10, dim=16, depth=1, max_len=32)
    with pytest.raises(ConfigError, match=r"sea\.topk_group: got 'batch'"):
        attention.make_config("sea", topk_group="batch")
    with pytest.raises(ConfigError, match=r"sea\.k: must be >= 1"):
        attention.make_config("sea", k=0)
    with pytest.raises(ValueError, match="cross attention"):
        SeaAttention(attention.make_config("sea", k=4, predictor_length=4), 16)(
            torch.randn(1, 8, 16), context=torch.randn(1, 5, 16))
    assert "sea" in attention.methods()


KERNEL_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from attention.sea import key_geometry, select_cells, sparse_attention_torch
    from attention.sea.kernel import sparse_attention_triton, sparse_attention_triton_with_lse
    torch.manual_seed(0)
    B, T, H, D, DV = 2, 11, 2, 12, 10
    TOL = {torch.float32: 1e-5, torch.float16: 3e-3}  # float16 inputs, float32 accumulation
    for causal, masked, bins, k in ((True, True, 5, 4), (False, False, 4, 11)):
        mask = (torch.rand(B, T) > 0.3) if masked else None
        geo = key_geometry(B, T, T, causal, mask, bins, torch.device("cpu"))
        sparse = select_cells(torch.rand(B, T, H, bins), geo, k, "query")
        for dtype in (torch.float32, torch.float16):
            q, kk = (torch.randn(B, T, H, D).to(dtype) for _ in range(2))
            v = torch.randn(B, T, H, DV).to(dtype)
            want, want_lse = sparse_attention_torch(q.double(), kk.double(), v.double(), sparse, geo)
            out, lse = sparse_attention_triton_with_lse(q, kk, v, sparse, geo)  # NaN-poisoned outputs
            assert not out.isnan().any() and not lse.isnan().any()
            torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
            torch.testing.assert_close(lse.double(), want_lse, atol=TOL[dtype], rtol=TOL[dtype])
            leaves = [x.clone().requires_grad_() for x in (q, kk, v)]
            grad = torch.randn(B, T, H, DV)
            got = torch.autograd.grad(sparse_attention_triton(*leaves, sparse, geo), leaves, grad.to(dtype))
            ref = [x.double().requires_grad_() for x in (q, kk, v)]
            want = torch.autograd.grad(sparse_attention_torch(*ref, sparse, geo)[0], ref, grad.double())
            for g, w in zip(got, want):
                assert not g.isnan().any()
                torch.testing.assert_close(g.double(), w, atol=4 * TOL[dtype], rtol=4 * TOL[dtype])
    print("kernel ok")
""")


def test_triton_kernel_matches_pytorch_path_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "kernel ok" in done.stdout, done.stdout + done.stderr
