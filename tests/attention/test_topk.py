"""Top-k attention: chunked op with hand-written backward vs dense float64 references, mixer, config."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attention
from attention.config import ConfigError
from attention.models import DecoderLM
from attention.softmax import softmax_attention_reference
from attention.topk import TopkConfig, topk_attention, topk_attention_reference


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


def make_qkv(dtype, b=2, t=63, s=None, h=2, d=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = s or t
    q = torch.randn(b, t, h, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


def padding_mask(b, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, -1] = True
    return mask


def assert_same_grads(out, ref, inputs, ref_inputs, atol):
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    want = torch.autograd.grad(ref, ref_inputs, grad)
    for g_got, g_want in zip(got, want):
        assert torch.isfinite(g_got).all()
        torch.testing.assert_close(g_got.to(g_want.dtype), g_want, rtol=0, atol=atol)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_k_equal_t_is_dense_softmax_float64(causal, use_mask):
    q, k, v = make_qkv(torch.float64)
    mask = padding_mask(2, 63) if use_mask else None
    out = topk_attention(q, k, v, topk=63, causal=causal, key_mask=mask, query_chunk=10)
    ref = softmax_attention_reference(q, k, v, causal=causal, key_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert_same_grads(out, ref, (q, k, v), (q, k, v), atol=1e-12)


# (T, S, k, causal, query_chunk): causal k=8 leaves the first rows with fewer than k visible keys;
# S != T is cross attention.
CASES = [(63, 63, 8, True, 7), (63, 63, 8, False, 64), (63, 63, 1, True, 5), (63, 63, 62, False, 16),
         (17, 41, 9, False, 4), (17, 41, 9, True, 3), (41, 17, 30, False, 8)]


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("t,s,topk,causal,query_chunk", CASES)
def test_matches_reference_float64(t, s, topk, causal, query_chunk, use_mask):
    q, k, v = make_qkv(torch.float64, t=t, s=s)
    mask = padding_mask(2, s) if use_mask else None
    kw = dict(topk=topk, causal=causal, key_mask=mask)
    out = topk_attention(q, k, v, query_chunk=query_chunk, **kw)
    ref = topk_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert_same_grads(out, ref, (q, k, v), (q, k, v), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_against_float64_reference(causal):
    q, k, v = make_qkv(torch.float64, seed=5)
    mask = padding_mask(2, 63)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = topk_attention(q32, k32, v32, topk=12, causal=causal, key_mask=mask, query_chunk=16)
    ref = topk_attention_reference(q, k, v, topk=12, causal=causal, key_mask=mask)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)  # float32 tolerance
    assert_same_grads(out, ref, (q32, k32, v32), (q, k, v), atol=2e-5)


def test_gradcheck_of_handwritten_backward():
    q, k, v = make_qkv(torch.float64, b=1, t=7, s=9, h=2, d=5, seed=2)
    mask = torch.tensor([[True] * 7 + [False, True]])
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v, c=causal: topk_attention(q, k, v, topk=3, causal=c, key_mask=mask, query_chunk=2),
            (q, k, v))


def test_chunked_equals_unchunked():
    q, k, v = make_qkv(torch.float64, seed=4)
    mask = padding_mask(2, 63)
    results = []
    for chunk in (1, 7, 63, 1024):
        out = topk_attention(q, k, v, topk=10, causal=True, key_mask=mask, query_chunk=chunk)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_ties_select_exactly_k(causal):
    # Every score is equal (q = 0); with v = identity the output row is the attention weights.
    s, topk = 10, 4
    q = torch.zeros(1, s, 1, s, dtype=torch.float64)
    k = torch.randn(1, s, 1, s, dtype=torch.float64)
    v = torch.eye(s, dtype=torch.float64)[None, :, None, :]  # (1, S, 1, S)
    for op in (topk_attention, topk_attention_reference):
        weights = op(q, k, v, topk=topk, causal=causal)[0, :, 0]  # (T, S)
        n_kept = torch.tensor([min(topk, i + 1) if causal else topk for i in range(s)])
        assert torch.equal((weights > 0).sum(-1), n_kept)
        torch.testing.assert_close(weights.sum(-1), torch.ones(s, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.allclose(weights[weights > 0], (1.0 / n_kept.double()).repeat_interleave(n_kept))


def test_row_with_no_visible_key_gets_zeros():
    q, k, v = make_qkv(torch.float64, b=2, t=9, h=1, d=4)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False  # the second sequence is all padding
    out = topk_attention(q, k, v, topk=3, key_mask=mask, query_chunk=4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_peak_memory_is_chunk_by_keys():
    t, chunk = 512, 32
    q, k, v = (x.detach().float().requires_grad_() for x in make_qkv(torch.float64, b=1, t=t, h=1, d=4))
    saved = []

    def pack(x):
        saved.append(x.untyped_storage().nbytes())
        return x

    with LargestStorage() as probe, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = topk_attention(q, k, v, topk=8, causal=True, query_chunk=chunk)
        out.sum().backward()
    scores_bytes = t * t * 4  # one float32 T x S matrix
    assert probe.nbytes <= chunk * t * 8 < scores_bytes / 4  # (chunk, S) tensors of 8 bytes at most
    assert max(saved) < scores_bytes / 16  # backward keeps q, k, v and (T, k) indices/probs, not (T, S)


def build_topk(**fields):
    return attention.build(attention.make_config("topk", **fields), 120).double()


def test_registered_with_capabilities():
    spec = attention.get("topk")
    assert spec.config_cls is TopkConfig
    assert (spec.capabilities.causal, spec.capabilities.cross, spec.capabilities.padding_mask) == (
        True, True, True)


def test_cross_attention_mixer_with_context_mask():
    torch.manual_seed(0)
    mixer = build_topk(k=5, heads=2, query_chunk=8)
    x = torch.randn(2, 21, 120, dtype=torch.float64)
    context = torch.randn(2, 33, 120, dtype=torch.float64)
    context_mask = padding_mask(2, 33)
    y = mixer(x, context=context, context_mask=context_mask)
    q = mixer.qkv.to_q(x).unflatten(-1, (2, 60))
    k, v = (t.unflatten(-1, (2, 60)) for t in mixer.qkv.to_kv(context).chunk(2, dim=-1))
    ref = topk_attention_reference(q, k, v, topk=5, key_mask=context_mask)
    torch.testing.assert_close(y, mixer.to_out(ref.flatten(2)), rtol=0, atol=1e-12)
    # padded context tokens change nothing
    changed = torch.where(context_mask[..., None], context, torch.randn_like(context) * 10)
    torch.testing.assert_close(mixer(x, context=changed, context_mask=context_mask), y, rtol=0, atol=1e-12)


def test_causal_mixer_does_not_see_the_future():
    torch.manual_seed(0)
    mixer = build_topk(k=6, causal=True, query_chunk=16)
    x = torch.randn(2, 63, 120, dtype=torch.float64)
    changed = x.clone()
    changed[:, 30] += torch.randn(2, 120, dtype=torch.float64)
    y, y_changed = mixer(x), mixer(changed)
    assert torch.equal(y[:, :30], y_changed[:, :30])
    assert not torch.allclose(y[:, 30], y_changed[:, 30])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_changes_nothing_at_real_positions(causal):
    torch.manual_seed(0)
    mixer = build_topk(k=6, causal=causal, query_chunk=16)
    x = torch.randn(2, 63, 120, dtype=torch.float64)
    mask = padding_mask(2, 63)
    changed = torch.where(mask[..., None], x, torch.randn_like(x) * 10)
    y, y_changed = mixer(x, mask=mask), mixer(changed, mask=mask)
    torch.testing.assert_close(y, y_changed, rtol=0, atol=1e-12)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))


@pytest.mark.parametrize("topk", [8, 63])
def test_bfloat16_autocast(topk):
    torch.manual_seed(0)
    mixer = attention.build(attention.make_config("topk", k=topk, query_chunk=16), 120)
    x = torch.randn(2, 63, 120)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())
    if topk == 63:
        # Elementwise only where nothing is dropped: bfloat16 rounding of the scores legitimately flips
        # which keys make the top k, and a flipped key changes an output by O(1).
        torch.testing.assert_close(y.float(), mixer(x), rtol=0, atol=5e-2)  # bfloat16 tolerance


def test_decoder_lm_trains_and_is_causal():
    torch.manual_seed(0)
    cfg = attention.make_config("topk", k=8, heads=2, query_chunk=20)
    model = DecoderLM(cfg, vocab=17, dim=60, depth=2, max_len=63).double()
    tokens = torch.randint(0, 17, (2, 63))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 17
    with torch.no_grad():
        assert torch.equal(model(tokens)[:, :40], model(changed)[:, :40])


def test_k_larger_than_sequence_is_refused():
    cfg = attention.make_config("topk", k=64)
    cfg.check_seq_len(64)
    with pytest.raises(ConfigError, match=r"topk\.k: got 64 .* 1 <= k <= 63"):
        cfg.check_seq_len(63)
    with pytest.raises(ConfigError, match=r"topk\.k"):
        DecoderLM(cfg, vocab=5, dim=16, depth=1, max_len=32)


@pytest.mark.parametrize("fields,field", [
    ({"k": 0}, "topk.k"),
    ({"k": "8"}, "topk.k"),
    ({"query_chunk": 0}, "topk.query_chunk"),
    ({"causal": 1}, "topk.causal"),
    ({"topk": 8}, "topk"),
])
def test_bad_config_raises_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        attention.make_config("topk", **fields)


FLEX_CASES = [(63, 63, 8, True, 7), (63, 63, 8, False, 64), (17, 41, 9, True, 3), (41, 17, 30, False, 8),
              (63, 63, 63, True, 16), (63, 63, 1, True, 5)]


@pytest.mark.filterwarnings("ignore")  # flex_attention warns that it runs uncompiled
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("t,s,topk,causal,query_chunk", FLEX_CASES)
def test_flex_path_forward_matches_reference(t, s, topk, causal, query_chunk, use_mask):
    """The CUDA path (thresholds + flex_attention's score_mod) run eagerly on the CPU, forward only (flex
    has no CPU backward; its gradient is checked on the GPU by benchmarks/bench_topk.py --check)."""
    from attention.topk.flex import topk_attention_flex, topk_thresholds

    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        q, k, v = (x.detach() for x in make_qkv(dtype, t=t, s=s))
        mask = padding_mask(2, s) if use_mask else None
        kw = dict(topk=topk, causal=causal, key_mask=mask)
        ref = topk_attention_reference(q.double(), k.double(), v.double(), **kw)
        heads = [x.transpose(1, 2) for x in (q, k, v)]  # (B, H, T, D)
        out = topk_attention_flex(*heads, scale=q.shape[-1] ** -0.5, query_chunk=query_chunk, compiled=False, **kw)
        torch.testing.assert_close(out.transpose(1, 2).double(), ref, rtol=0, atol=atol)
    # rows that see more than k keys keep exactly k of them (no ties in random data)
    tau = topk_thresholds(*heads[:2], scale=q.shape[-1] ** -0.5, query_chunk=query_chunk, **kw)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    allowed = torch.ones(t, s, dtype=torch.bool).tril(s - t) if causal else torch.ones(t, s, dtype=torch.bool)
    allowed = allowed & (mask[:, None, None, :] if use_mask else True)
    kept = ((scores >= tau[..., None]) & allowed).sum(-1)
    torch.testing.assert_close(kept, allowed.sum(-1).expand_as(kept).clamp(max=topk), rtol=0, atol=0)


def test_backend_is_validated_and_the_mixer_dispatches():
    with pytest.raises(ConfigError, match="backend"):
        TopkConfig(backend="cuda")
    reference = attention.build(TopkConfig(k=4, causal=True, heads=2, backend="reference"), 16)
    auto = attention.build(TopkConfig(k=4, causal=True, heads=2), 16)  # 'auto' off CUDA: the chunked op
    auto.load_state_dict(reference.state_dict())
    x = torch.randn(2, 20, 16)
    torch.testing.assert_close(auto(x), reference(x), rtol=0, atol=0)
