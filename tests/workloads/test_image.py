"""workloads.image: a ViT with any mixer on real MNIST / Fashion-MNIST / digits."""


import numpy as np
import pytest
import torch

from attention.config import ConfigError
from tests.workloads.conftest import run_smoke
from workloads.common.images import apply_variant
from workloads.common.report import LocalReporter
from workloads.common.train import fit
from workloads.contract import merge
from workloads.image import DEFAULTS, SMOKE, build_task

pytestmark = pytest.mark.usefixtures("data_cache")  # tests/workloads/conftest.py



def test_smoke_runs_offline():
    result = run_smoke("image")
    assert 0 <= result["val/acc"] <= 1 and np.isfinite(result["val/loss"])


def test_short_run_on_mnist_learns():
    config = merge(DEFAULTS, {"model": {"dim": 32, "depth": 1, "patch_size": 7},
                              "data": {"eval_examples": 500},
                              "train": {"steps": 60, "batch_size": 32, "lr": 3e-3, "warmup": 5,
                                        "eval_every": 60, "log_every": 10}})
    task, train = build_task(config)
    torch.manual_seed(0)
    before = task.evaluate(task.build_model().eval(), torch.device("cpu"))
    reporter = LocalReporter(quiet=True)
    after = fit(task, train, reporter, seed=0, device=torch.device("cpu"), progress=False)
    losses = [h["train/loss"] for h in reporter.history]
    assert losses[-1] < losses[0] - 0.5
    assert after["val/loss"] < before["val/loss"] - 0.5
    assert after["val/acc"] > 0.3 > before["val/acc"] + 0.1  # chance is 0.1


def test_batches_are_a_pure_function_of_seed_step_rank():
    task, _ = build_task(merge(DEFAULTS, SMOKE))
    cpu = torch.device("cpu")
    x1, y1 = task.batch(3, 0, cpu)
    x2, y2 = task.batch(3, 0, cpu)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(task.batch(3, 1, cpu)[0], x1) and not torch.equal(task.batch(4, 0, cpu)[0], x1)
    assert x1.min() >= -1 and x1.max() <= 1 and x1.shape == (16, 8, 8)


def test_variant_reaches_the_training_batches():
    config = merge(DEFAULTS, merge(SMOKE, {"data": {"variant": "inverted"}}))
    task, _ = build_task(config)
    plain, _ = build_task(merge(DEFAULTS, SMOKE))
    x, _ = task.batch(0, 0, torch.device("cpu"))
    x_plain, _ = plain.batch(0, 0, torch.device("cpu"))
    torch.testing.assert_close(x, -x_plain)  # 255 - p maps p / 127.5 - 1 to its negative


def test_variant_function_is_what_the_task_uses():
    task, _ = build_task(merge(DEFAULTS, merge(SMOKE, {"data": {"variant": "rotated"}})))
    plain, _ = build_task(merge(DEFAULTS, SMOKE))
    np.testing.assert_array_equal(task.images.test_images, apply_variant(plain.images.test_images, "rotated"))


@pytest.mark.parametrize("method, attn", [("linear", {}), ("local", {"window_size": 4}), ("topk", {"k": 3}),
                                          ("colt5", {"num_routed_q": 3, "num_routed_kv": 3,
                                                     "num_routed_ff": 3, "light_window": 4})])
def test_any_mixer_plugs_in(method, attn):
    config = merge(DEFAULTS, merge(SMOKE, {"attn": {"method": method, **attn},
                                           "data": {"dataset": "digits"}, "model": {"patch_size": 2}}))
    task, train = build_task(config)
    model = task.build_model()
    loss, n = task.loss(model, task.batch(0, 0, torch.device("cpu")))
    loss.backward()
    assert n == train.batch_size and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_validation_builds_on_meta_without_data():
    task, _ = build_task(merge(DEFAULTS, {"model": {"dim": 48}}), validate_only=True)
    with torch.device("meta"):
        model = task.build_model()
    assert next(model.parameters()).device.type == "meta"
    assert "images" not in task.__dict__  # nothing was loaded


@pytest.mark.parametrize("override, field", [
    ({"model": {"patch_size": 5}}, r"model\.patch_size: got 5.*28x28 images of mnist"),
    ({"model": {"pool": "max"}}, r"model\.pool: got 'max'"),
    ({"model": {"width": 8}}, r"model: unknown field\(s\) width"),
    ({"attn": {"method": "softmax", "causal": True}}, r"attn\.causal: got True"),
    ({"data": {"dataset": "cifar10"}}, r"data\.dataset: got 'cifar10'"),
    ({"data": {"variant": "blurred"}}, r"data\.variant: got 'blurred'"),
    ({"data": {"eval_examples": -1}}, r"data\.eval_examples: got -1"),
    ({"attn": {"method": "topk", "k": 64}}, r"topk\.k: got 64 for sequences of 50 tokens"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        build_task(merge(DEFAULTS, override), validate_only=True)
