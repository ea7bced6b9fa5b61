"""The transformer models: recurrent decoding equals the full forward, generation works for every
causal method, and any registered mixer plugs in."""

import pytest
import torch

import attention
from attention.models import DecoderLM, Encoder


def _lm(method: str, **knobs) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(attention.make_config(method, **knobs), vocab=50, dim=32, depth=2, max_len=40).double().eval()


@pytest.mark.parametrize("method, knobs", [("linear", {}), ("linear", {"feature_map": "performer"}), ("homm", {})])
def test_recurrent_decoding_equals_the_full_forward(method, knobs):
    model = _lm(method, **knobs)
    assert model.recurrent
    tokens = torch.randint(0, 50, (3, 23))
    full = model(tokens)  # (B, T, vocab)
    states = model.init_state(3, dtype=torch.float64)
    for pos in range(tokens.shape[1]):
        logits, states = model.step(tokens[:, pos], pos, states)
        torch.testing.assert_close(logits, full[:, pos], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("method", ["linear", "homm"])
def test_greedy_generation_is_the_same_recurrent_or_not(method):
    model = _lm(method)
    prompt = torch.randint(0, 50, (2, 5))
    recurrent = model.generate(prompt, 10, temperature=0)
    full = model.generate(prompt, 10, temperature=0, use_state=False)
    assert torch.equal(recurrent, full) and recurrent.shape == (2, 15)
    assert torch.equal(recurrent[:, :5], prompt)


@pytest.mark.parametrize("method", ["softmax", "local", "topk"])
def test_non_recurrent_methods_generate_through_the_full_forward(method):
    knobs = {"k": 4} if method == "topk" else {"window_size": 8} if method == "local" else {}
    model = _lm(method, **knobs)
    assert not model.recurrent
    out = model.generate(torch.randint(0, 50, (2, 4)), 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 10) and out.min() >= 0 and out.max() < 50


def test_every_registered_method_builds_an_encoder():
    for method in attention.methods():
        spec = attention.get(method)
        knobs = {"k": 4, "predictor_length": 8} if method == "sea" else {}
        cfg = spec.config_cls.from_dict({k: v for k, v in knobs.items()
                                         if k in spec.config_cls.__dataclass_fields__})
        try:
            cfg.check_seq_len(64)
        except attention.ConfigError:
            continue  # defaults sized for longer sequences; the sweeps' tests cover those
        model = Encoder(cfg, dim=32, depth=1, max_len=64)
        y = model(torch.randn(2, 64, 32))
        assert y.shape == (2, 64, 32) and torch.isfinite(y).all(), method
