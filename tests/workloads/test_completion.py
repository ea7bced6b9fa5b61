"""workloads.completion: autoregressive pixel model completing occluded MNIST digits."""


import numpy as np
import pytest
import torch

from attention import make_config
from attention.config import ConfigError
from attention.models import DecoderLM
from tests.workloads.conftest import run_smoke
from workloads.common.images import load_images
from workloads.common.report import LocalReporter
from workloads.common.train import fit
from workloads.completion import DEFAULTS, SMOKE, build_task
from workloads.completion.generate import RecurrentDecoder, complete, is_recurrent
from workloads.completion.pixels import classify, to_tokens, train_classifier
from workloads.contract import merge

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("data_cache")  # tests/workloads/conftest.py


def test_smoke_runs_offline():
    result = run_smoke("completion")
    assert 0 <= result["val/acc"] <= 1 and result["perf/completion_ms"] > 0 and result["gen/recurrent"] == 0


def test_tokens_pool_and_quantize():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(to_tokens(images, 1, 256), images)  # identity at full resolution
    tokens = to_tokens(images, 2, 8)
    assert tokens.shape == (3, 14, 14) and tokens.min() >= 0 and tokens.max() <= 7
    block_mean = images[0, 2:4, 6:8].astype(float).mean()
    assert tokens[0, 1, 3] == int(block_mean * 8 / 256)
    assert to_tokens(np.full((1, 4, 4), 255, np.uint8), 2, 4).tolist() == [[[3, 3], [3, 3]]]


@pytest.mark.parametrize("method", ["linear", "homm"])
def test_recurrent_decoding_matches_the_full_forward(method):
    torch.manual_seed(0)
    model = DecoderLM(make_config(method), vocab=7, dim=60, depth=2, max_len=23).double().eval()
    assert is_recurrent(model)
    tokens = torch.randint(0, 7, (3, 23))
    full = model(tokens)
    decoder = RecurrentDecoder(model, 3, CPU, torch.float64)
    stepped = torch.stack([decoder.step(tokens[:, t]) for t in range(23)], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9)  # float64: one computation, reordered


def test_both_paths_complete_alike_and_keep_the_prompt():
    torch.manual_seed(1)
    model = DecoderLM(make_config("linear"), vocab=5, dim=32, depth=2, max_len=20).double().eval()
    prompt = torch.randint(0, 4, (4, 8))
    greedy_rec = complete(model, prompt, 20, bos=4, temperature=0, recurrent=True)
    greedy_full = complete(model, prompt, 20, bos=4, temperature=0, recurrent=False)
    assert torch.equal(greedy_rec, greedy_full) and torch.equal(greedy_rec[:, :8], prompt)
    sampled = [complete(model, prompt, 20, bos=4, temperature=1.0, recurrent=r,
                        generator=torch.Generator().manual_seed(5)) for r in (True, False)]
    assert torch.equal(*sampled)  # the same draws from the same distributions


def test_classifier_learns_under_autocast_too():
    # Trained lazily inside fit's evaluation, i.e. under bf16 autocast on a GPU: autocast's weight cache
    # must not freeze it at its initial weights.
    images = load_images("digits")
    train = to_tokens(images.train_images, 2, 4).reshape(1500, -1)
    test = torch.from_numpy(to_tokens(images.test_images, 2, 4).reshape(297, -1))
    accuracy = []
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model = train_classifier(train, images.train_labels, 10, 4, 60, CPU)
            accuracy.append((classify(model, test).numpy() == images.test_labels).mean())
    assert accuracy[0] > 0.5 and accuracy[1] == accuracy[0]


def test_short_run_on_mnist_learns_and_completes():
    config = merge(DEFAULTS, {"model": {"dim": 32, "depth": 1},
                              "data": {"downsample": 4, "levels": 4, "eval_examples": 128,
                                       "complete_examples": 64, "classifier_steps": 300},
                              "train": {"steps": 40, "batch_size": 16, "lr": 3e-3, "warmup": 4,
                                        "eval_every": 40, "log_every": 10}})
    task, train = build_task(config)
    torch.manual_seed(0)
    before = task.evaluate(task.build_model().eval(), CPU)
    reporter = LocalReporter(quiet=True)
    after = fit(task, train, reporter, seed=0, device=CPU, progress=False)
    assert after["val/loss"] < before["val/loss"] - 0.3  # nats per pixel, from ~ln 4
    assert reporter.history[-1]["train/loss"] < reporter.history[0]["train/loss"]
    # the judge reads whole 7x7 digits well, and half-hidden ones badly
    assert after["val/acc_clean"] > 0.7 and after["val/acc_occluded"] < after["val/acc_clean"] - 0.2
    assert 0 <= after["val/acc"] <= 1 and after["perf/completion_ms"] > 0 and after["gen/recurrent"] == 0
    assert after["val/acc_clean"] == before["val/acc_clean"]  # one classifier, whatever the model


def test_linear_generates_recurrently_in_the_workload():
    task, _ = build_task(merge(DEFAULTS, merge(SMOKE, {"attn": {"method": "linear"}})))
    metrics = task.evaluate(task.build_model().eval(), CPU)
    assert metrics["gen/recurrent"] == 1.0


def test_validation_builds_on_meta_without_data():
    task, _ = build_task(DEFAULTS, validate_only=True)
    with torch.device("meta"):
        model = task.build_model()
    assert model.max_len == 196 and model.head.out_features == 9  # 14x14 pixels, 8 levels + start
    assert "splits" not in task.__dict__


@pytest.mark.parametrize("override, field", [
    ({"data": {"downsample": 5}}, r"data\.downsample: got 5.*28x28 images of mnist"),
    ({"data": {"levels": 1}}, r"data\.levels: got 1"),
    ({"data": {"temperature": -1}}, r"data\.temperature: got -1"),
    ({"data": {"dataset": "svhn"}}, r"data\.dataset: got 'svhn'"),
    ({"attn": {"method": "topk", "k": 400}}, r"topk\.k: got 400 for sequences of 196"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        build_task(merge(DEFAULTS, override), validate_only=True)
