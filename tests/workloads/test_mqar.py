"""workloads.mqar: the Zoology multi-query associative recall generator and workload."""


import numpy as np
import pytest
import torch

from attention.config import ConfigError
from tests.workloads.conftest import run_smoke
from workloads.common.report import LocalReporter
from workloads.common.train import fit
from workloads.contract import merge
from workloads.mqar import DEFAULTS, SMOKE, build_task
from workloads.mqar.task import IGNORE, MQARData, mqar_batch


def test_generated_sequences_follow_the_task():
    cfg = MQARData(seq_len=61, num_kv_pairs=7, vocab_size=50)  # odd length, odd pair count
    x, y = mqar_batch(cfg, 64, np.random.default_rng(3))
    assert x.shape == y.shape == (64, 61) and x.dtype == y.dtype == np.int64
    assert x.min() >= 0 and x.max() < 50
    half, context = 25, 14
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:context:2], row_x[1:context:2]
        assert len(set(keys.tolist())) == 7 and keys.min() >= 1 and keys.max() < half
        assert values.min() >= half
        query_pos = np.flatnonzero(row_y != IGNORE)
        assert len(query_pos) == 7 and query_pos.min() >= context and query_pos.max() < 61 - 1
        assert ((query_pos - context) % 2 == 0).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        # at each query position the input is a key, and the label its value from the context
        assert sorted(row_x[query_pos].tolist()) == sorted(keys.tolist())
        assert [pairs[k] for k in row_x[query_pos].tolist()] == row_y[query_pos].tolist()


def test_generator_is_seeded_and_query_gaps_follow_the_power_law():
    cfg = MQARData(seq_len=256, num_kv_pairs=8, vocab_size=128)
    a = mqar_batch(cfg, 4, np.random.default_rng([1, 2]))
    b = mqar_batch(cfg, 4, np.random.default_rng([1, 2]))
    c = mqar_batch(cfg, 4, np.random.default_rng([1, 3]))
    assert all(np.array_equal(p, q) for p, q in zip(a, b)) and not np.array_equal(a[0], c[0])
    _, y = mqar_batch(cfg, 2000, np.random.default_rng(0))
    gaps = (np.nonzero(y != IGNORE)[1] - 16) // 2  # 120 query slots
    # p(g) ~ g^-0.99 puts most queries near the pairs; uniform slots would give a mean near 60.
    assert gaps.mean() < 45 and np.median(gaps) < 35


def test_loss_and_accuracy_count_only_the_queries():
    task, _ = build_task(merge(DEFAULTS, SMOKE))
    x, y = task.batch(0, 0, torch.device("cpu"))

    class Oracle(torch.nn.Module):  # right at every query, garbage elsewhere
        def forward(self, tokens):
            logits = torch.randn(*tokens.shape, 32)
            rows, cols = torch.nonzero(y != IGNORE, as_tuple=True)
            logits[rows, cols, y[rows, cols]] = 100.0
            return logits

    loss, n = task.loss(Oracle(), (x, y))
    assert n == 8 * 4 and loss.item() < 1e-6
    assert task.evaluate(_AlwaysRight(task), torch.device("cpu"))["val/acc"] == 1.0


class _AlwaysRight(torch.nn.Module):
    """Answers each query from the pairs at the start of the sequence (what a perfect model does)."""

    def __init__(self, task):
        super().__init__()
        self.n, self.v = task.data.num_kv_pairs, task.data.vocab_size

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.v)
        for b, row in enumerate(tokens.tolist()):
            pairs = dict(zip(row[0:2 * self.n:2], row[1:2 * self.n:2]))
            for t in range(2 * self.n, len(row)):
                logits[b, t, pairs.get(row[t], 0)] = 1.0
        return logits


@pytest.mark.parametrize("method", ["softmax", "linear"])
def test_short_run_lowers_the_loss(method):
    config = merge(DEFAULTS, {"attn": {"method": method},
                              "model": {"dim": 32, "depth": 1},
                              "data": {"seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32, "eval_examples": 64},
                              "train": {"steps": 40, "batch_size": 16, "lr": 3e-3, "warmup": 4,
                                        "eval_every": 40, "log_every": 10}})
    task, train = build_task(config)
    torch.manual_seed(0)
    before = task.evaluate(task.build_model().eval(), torch.device("cpu"))
    reporter = LocalReporter(quiet=True)
    after = fit(task, train, reporter, seed=0, device=torch.device("cpu"), progress=False)
    assert after["val/loss"] < before["val/loss"] - 0.5  # from ~ln 32 towards ln(#values)
    assert reporter.history[-1]["train/loss"] < reporter.history[0]["train/loss"]


def test_smoke_runs_offline():
    result = run_smoke("mqar", "--method", "linear")
    assert 0 <= result["val/acc"] <= 1 and "val/acc_seq" in result


def test_validation_builds_on_meta():
    task, _ = build_task(DEFAULTS, validate_only=True)
    with torch.device("meta"):
        assert next(task.build_model().parameters()).is_meta


@pytest.mark.parametrize("override, field", [
    ({"data": {"seq_len": 60, "num_kv_pairs": 16}}, r"data\.seq_len: got 60.*>= 4 \* data\.num_kv_pairs = 64"),
    ({"data": {"vocab_size": 20, "num_kv_pairs": 16}}, r"data\.vocab_size: got 20.*>= 34"),
    ({"data": {"num_kv_pairs": 0}}, r"data\.num_kv_pairs: got 0"),
    ({"data": {"power_a": 0}}, r"data\.power_a: got 0"),
    ({"data": {"keys": 3}}, r"data: unknown field\(s\) keys"),
    ({"model": {"depth": 0}}, r"model\.depth: got 0"),
    ({"attn": {"method": "topk", "k": 100}}, r"topk\.k: got 100 for sequences of 64"),
    ({"train": {"lr": 2}}, r"train\.lr: got 2"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        build_task(merge(DEFAULTS, override), validate_only=True)
