"""workloads.lora: base on plain MNIST, fine-tuning on a variant fully / with LoRA / LoRA from scratch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from attention.config import ConfigError
from attention.lora import LoRALinear
from workloads.common import checkpoint as checkpoint_file
from workloads.common.images import apply_variant
from workloads.common.report import LocalReporter
from workloads.common.train import fit, seed_everything
from workloads.contract import merge
from workloads.image import DEFAULTS as IMAGE_DEFAULTS
from workloads.image import SMOKE as IMAGE_SMOKE
from workloads.image import build_task as build_image_task
from workloads.image.model import to_pixels
from workloads.lora import DEFAULTS, SMOKE, build_task
from workloads.lora.task import LoRATask

CPU = torch.device("cpu")
# Small, but on real MNIST: a base that learns in 100 steps, then 40 steps of fine-tuning.
MNIST = merge(DEFAULTS, {"model": {"dim": 32, "depth": 1, "patch_size": 7, "base_steps": 100, "base_lr": 5e-3},
                         "data": {"variant": "inverted", "eval_examples": 500},
                         "lora": {"rank": 4},
                         "train": {"steps": 40, "batch_size": 32, "lr": 1e-2, "warmup": 4, "eval_every": 40,
                                   "log_every": 10}})
TINY = merge(DEFAULTS, SMOKE)  # digits


pytestmark = pytest.mark.usefixtures("data_cache")  # tests/workloads/conftest.py


def train(config, reporter=None):
    """fit() the task, keeping the model it trained."""
    task, train_cfg = build_task(config)
    build, kept = task.build_model, {}
    task.build_model = lambda: kept.setdefault("model", build())
    reporter = reporter or LocalReporter(quiet=True)
    result = fit(task, train_cfg, reporter, seed=int(config["seed"]), device=CPU, progress=False)
    return task, kept["model"], reporter, result


def forbid_pretraining(monkeypatch):
    def fail(self):
        raise AssertionError("pre-training ran")
    monkeypatch.setattr(LoRATask, "pretrain", fail)


def test_smoke_runs_offline():
    out = subprocess.run([sys.executable, "-m", "workloads.lora", "--smoke"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("final: ", 1)[1].splitlines()[0])
    assert 0 <= result["val/acc"] <= 1 and result["lora/adapted_layers"] == 5  # q, kv, out, 2 MLP layers


def test_lora_on_inverted_mnist_learns_with_the_base_frozen(data_cache):
    task, model, reporter, result = train(MNIST)
    # the base learnt plain MNIST, and the inverted images really are another task for it
    assert result["start/acc_plain"] > 0.4
    assert result["start/acc_variant"] < result["start/acc_plain"] - 0.2
    # fine-tuning on the variant lowers its loss and lifts its accuracy
    assert result["val/loss"] < result["start/loss_variant"] - 0.3
    assert result["val/acc"] > result["start/acc_variant"] + 0.1
    # only adapters and the head trained: the base weights are the cached pre-trained ones, bit for bit
    base = torch.load(data_cache / "lora-base" / f"{task.base_key()}.pt", weights_only=True)
    state = model.state_dict()
    for name, value in base.items():
        module, _, leaf = name.rpartition(".")
        adapted = f"{module}.base.{leaf}"  # where a LoRA-wrapped Linear keeps its frozen weight
        if name.startswith("head."):
            assert not torch.equal(state[name], value)
        else:
            assert torch.equal(state.get(adapted, state.get(name)), value), name
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 5 and all(m.lora_B.abs().sum() > 0 for m in layers)
    expected = sum(m.lora_A.numel() + m.lora_B.numel() for m in layers) + sum(
        p.numel() for p in model.head.parameters())
    assert reporter.history[-1]["params/trainable"] == expected
    assert reporter.history[-1]["params/total"] == sum(p.numel() for p in model.parameters())


def test_full_fine_tuning_trains_every_parameter(data_cache):
    config = merge(MNIST, {"lora": {"mode": "full"}, "train": {"steps": 5, "eval_every": 5}})
    task, model, reporter, result = train(config)  # the base comes from the cache of the test above
    assert reporter.history[-1]["params/trainable"] == reporter.history[-1]["params/total"]
    base = torch.load(data_cache / "lora-base" / f"{task.base_key()}.pt", weights_only=True)
    assert all(not torch.equal(model.state_dict()[k], v) for k, v in base.items())
    assert result["lora/adapted_layers"] == 0 and result["start/acc_plain"] > 0.4


def test_lora_from_scratch_trains_adapters_on_the_variant(monkeypatch):
    forbid_pretraining(monkeypatch)
    config = merge(MNIST, {"lora": {"mode": "lora_scratch"}, "data": {"variant": "rotated"},
                           "train": {"steps": 5, "eval_every": 5}})
    task, model, reporter, result = train(config)
    assert result["start/acc_plain"] < 0.3  # a random base
    assert reporter.history[-1]["params/trainable"] < reporter.history[-1]["params/total"] / 2
    # the training batches are the rotated images (the peer trained these runs on plain MNIST)
    x, y = task.batch(0, 0, CPU)
    plain = task.plain
    idx = np.sort(np.random.default_rng([0, 0, 0]).integers(0, 60000, size=32))
    torch.testing.assert_close(x, to_pixels(apply_variant(plain.train_images[idx], "rotated"), CPU))
    assert not torch.equal(x, to_pixels(plain.train_images[idx], CPU))


def test_cached_base_gives_the_same_model_as_pretraining(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_DATA", str(tmp_path))  # an empty cache: the first build pre-trains
    config = merge(TINY, {"model": {"base_steps": 7}})

    def built():
        task, _ = build_task(config)
        seed_everything(0)
        return task.build_model().state_dict()

    first = built()
    assert len(list((tmp_path / "lora-base").glob("*.pt"))) == 1
    forbid_pretraining(monkeypatch)
    second = built()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_base_from_an_image_workload_checkpoint(tmp_path):
    image_config = merge(IMAGE_DEFAULTS, merge(IMAGE_SMOKE, {"train": {"steps": 6, "eval_every": 6}}))
    image_task, image_train = build_image_task(image_config)
    image_result = fit(image_task, image_train, LocalReporter(tmp_path, quiet=True), device=CPU, progress=False)
    checkpoint = tmp_path / "checkpoint" / "state.pt"
    config = merge(TINY, {"model": {"base_checkpoint": str(checkpoint)}, "data": {"variant": "plain"},
                          "lora": {"mode": "full"}})
    task, _ = build_task(config)
    model = task.build_model()
    saved = checkpoint_file.load(checkpoint)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert task.start_metrics["start/acc_plain"] == pytest.approx(image_result["val/acc"])

    wrong = merge(config, {"model": {"dim": 48}})
    with pytest.raises(ValueError, match=r"model\.base_checkpoint: .* does not fit this ViT"):
        build_task(wrong)[0].build_model()
    with pytest.raises(FileNotFoundError, match=r"model\.base_checkpoint: '/nonexistent.pt'"):
        build_task(merge(config, {"model": {"base_checkpoint": "/nonexistent.pt"}}))[0].build_model()


class Interrupt(LocalReporter):
    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        super().report(metrics, step, checkpoint_dir)
        if step == 4:
            raise KeyboardInterrupt


def test_resume_continues_the_same_curve(tmp_path):
    config = merge(TINY, {"train": {"steps": 8, "eval_every": 4, "log_every": 1}, "lora": {"dropout": 0.1}})
    _, _, full, _ = train(config)
    with pytest.raises(KeyboardInterrupt):
        train(config, Interrupt(tmp_path, quiet=True))
    _, _, resumed, _ = train(config, LocalReporter(tmp_path, quiet=True))
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == [1, 2, 3, 4, 5, 6, 7, 8]  # the same curve, continued
    for key in ("train/loss", "val/loss", "val/acc"):
        got = [(h["step"], h[key]) for h in logged if key in h]
        want = [(h["step"], h[key]) for h in full.history if key in h]
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) >= 2, key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key


def test_validation_builds_on_meta_without_data_or_base(monkeypatch):
    forbid_pretraining(monkeypatch)
    task, _ = build_task(merge(DEFAULTS, {"lora": {"rank": 64}}), validate_only=True)
    with torch.device("meta"):
        model = task.build_model()
    assert len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 10
    assert "images" not in task.__dict__ and "plain" not in task.__dict__


@pytest.mark.parametrize("override, field", [
    ({"lora": {"mode": "adapters"}}, r"lora\.mode: got 'adapters'.*full, lora, lora_scratch"),
    ({"lora": {"rank": 0}}, r"lora\.rank: must be >= 1, got 0"),
    ({"lora": {"alpha": -1}}, r"lora\.alpha"),
    ({"lora": {"ranks": 4}}, r"lora: unknown field\(s\) ranks"),
    ({"model": {"base_steps": 0}}, r"model\.base_steps: got 0"),
    ({"data": {"variant": "mirrored"}}, r"data\.variant: got 'mirrored'"),
    ({"attn": {"method": "linear", "causal": True}}, r"attn\.causal: got True"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        build_task(merge(DEFAULTS, override), validate_only=True)


def test_targets_matching_nothing_fail_at_validation():
    task, _ = build_task(merge(DEFAULTS, {"lora": {"targets": ["*.attention.query"]}}), validate_only=True)
    with torch.device("meta"), pytest.raises(ConfigError, match=r"lora\.targets: .* matched no nn\.Linear"):
        task.build_model()
