"""LoRA adapters: config validation, injection, freezing, merge/unmerge, adapter state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attention
from attention.config import ConfigError
from attention.lora import (
    LoRAConfig,
    LoRALinear,
    count_params,
    freeze_base,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from attention.models import DecoderLM

ATTN_TARGETS = ("*.to_q", "*.to_kv")


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = attention.make_config("softmax", heads=2, causal=True)
    return DecoderLM(cfg, vocab=23, dim=60, depth=2, max_len=63).to(dtype)


def tokens(seed=0):
    return torch.randint(0, 23, (2, 63), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=3):
    # B starts at zero; give it values so that merging has something to fold in.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("fields,field", [
    ({"rank": 0}, "lora.rank"),
    ({"rank": 2.0}, "lora.rank"),
    ({"alpha": 0}, "lora.alpha"),
    ({"alpha": -1.0}, "lora.alpha"),
    ({"dropout": 1.0}, "lora.dropout"),
    ({"dropout": -0.1}, "lora.dropout"),
    ({"targets": ()}, "lora.targets"),
    ({"targets": ("",)}, "lora.targets"),
    ({"targets": ("re:(",)}, "lora.targets"),
    ({"targets": 3}, "lora.targets"),
    ({"train_also": (None,)}, "lora.train_also"),
])
def test_bad_config_raises_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        LoRAConfig(**fields)


def test_config_from_sweep_dict():
    cfg = LoRAConfig.from_dict({"rank": 4, "alpha": 8, "targets": ["*.to_q"], "train_also": "head"})
    assert cfg.targets == ("*.to_q",) and cfg.train_also == ("head",) and cfg.scaling == 2.0
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field.*ranks"):
        LoRAConfig.from_dict({"ranks": 4})


def test_inject_matches_names_and_leaves_output_unchanged():
    model = make_model()
    x = tokens()
    before = model(x)
    names = inject_lora(model, LoRAConfig(rank=4, targets=ATTN_TARGETS))
    assert names == [f"body.blocks.{i}.mixer.qkv.{p}" for i in range(2) for p in ("to_q", "to_kv")]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(x), before)  # B = 0 at init


def test_regex_targets_match_like_globs():
    glob_names = inject_lora(make_model(), LoRAConfig(targets=ATTN_TARGETS))
    regex_names = inject_lora(make_model(), LoRAConfig(targets=(r"re:.*\.qkv\.to_(q|kv)",)))
    assert glob_names == regex_names


def test_no_match_lists_the_models_linear_layers():
    with pytest.raises(ConfigError, match=r"lora\.targets.*matched no nn\.Linear.*body\.blocks\.0\.mixer"):
        inject_lora(make_model(), LoRAConfig(targets=("*.to_qkv",)))


def test_layers_are_not_wrapped_twice():
    model = make_model()
    names = inject_lora(model, LoRAConfig(targets=("*",)))
    assert "head" in names
    with pytest.raises(ConfigError, match="matched no nn.Linear"):
        inject_lora(model, LoRAConfig(targets=("*",)))


def test_freeze_base_and_count_params():
    model = make_model()
    with pytest.raises(ValueError, match="inject_lora first"):
        freeze_base(model)
    total_before = sum(p.numel() for p in model.parameters())
    rank = 4
    names = inject_lora(model, LoRAConfig(rank=rank, targets=ATTN_TARGETS))
    freeze_base(model)
    adapter = sum(rank * (m.base.in_features + m.base.out_features)
                  for m in (model.get_submodule(n) for n in names))
    assert count_params(model) == (adapter, total_before + adapter)
    freeze_base(model, train_also=("head",))
    assert count_params(model) == (adapter + model.head.weight.numel(), total_before + adapter)
    with pytest.raises(ConfigError, match="lora.train_also.*'classifier'"):
        freeze_base(model, train_also=("classifier",))


def test_only_adapters_change_in_training():
    model = make_model()
    inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=ATTN_TARGETS))
    freeze_base(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = tokens()
    for _ in range(2):  # step 1 moves B (A's gradient is B^T ... = 0), step 2 moves A as well
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        is_adapter = name.endswith(("lora_A", "lora_B"))
        assert torch.equal(p, before[name]) != is_adapter, name


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merge_matches_unmerged_and_unmerge_restores_exactly(dtype, atol):
    model = make_model(dtype=dtype)
    inject_lora(model, LoRAConfig(rank=4, alpha=16, dropout=0.5, targets=("*.to_q", "*.to_kv", "head")))
    randomize_adapters(model)
    model.eval()  # adapter dropout is off in eval, as it must be for merged == unmerged
    x = tokens()
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    unmerged = model(x)
    assert merge_lora(model) == 5
    assert merge_lora(model) == 0  # already merged: nothing folded twice
    assert not torch.equal(model.head.base.weight, weights["head.base.weight"])
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=atol)
    assert unmerge_lora(model) == 5
    for name, t in model.state_dict().items():
        assert torch.equal(t, weights[name]), name
    assert torch.equal(model(x), unmerged)


def test_adapter_state_dict_round_trip():
    model = make_model()
    inject_lora(model, LoRAConfig(rank=2, targets=ATTN_TARGETS))
    randomize_adapters(model)
    state = lora_state_dict(model)
    assert set(state) == {f"body.blocks.{i}.mixer.qkv.{p}.lora_{ab}"
                          for i in range(2) for p in ("to_q", "to_kv") for ab in "AB"}
    fresh = make_model()  # same seed: same base weights
    inject_lora(fresh, LoRAConfig(rank=2, targets=ATTN_TARGETS))
    x = tokens()
    assert not torch.equal(fresh(x), model(x))
    load_lora_state_dict(fresh, state)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(fresh, {k: v for k, v in state.items() if "blocks.0" not in k})
    merge_lora(fresh)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        load_lora_state_dict(fresh, state)


def test_adapter_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(60, 30), rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 60)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_encoder_classifier_fine_tunes_head_and_adapters():
    torch.manual_seed(0)
    cfg = attention.make_config("topk", k=8, heads=2)
    encoder = attention.models.Encoder(cfg, dim=60, depth=1, max_len=63)
    model = nn.ModuleDict({"encoder": encoder, "classifier": nn.Linear(60, 10)})
    inject_lora(model, LoRAConfig(rank=4, targets=("encoder.*",)))
    freeze_base(model, train_also=("classifier",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert all(n.startswith("classifier.") or n.endswith(("lora_A", "lora_B")) for n in trainable)
    x = torch.randn(2, 63, 60)
    mask = torch.ones(2, 63, dtype=torch.bool)
    logits = model["classifier"](encoder(x, mask=mask).mean(1))
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
