"""workloads.speed: time and peak memory per method as the sequence grows."""

import json
import os
import subprocess
import sys

import pytest
import torch

from attention import build, make_config
from attention.config import ConfigError
from workloads.common.report import LocalReporter
from workloads.contract import merge
from workloads.speed import DEFAULTS, SMOKE, WORKLOAD, build_task
from workloads.speed.measure import LiveTensorBytes, forward_and_backward, forward_only, peak_mib

CPU = torch.device("cpu")


def test_smoke_writes_one_report_per_length(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workloads.speed", "--smoke", "--method", "linear",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [16, 32, 64]
    for r in rows:
        assert r["perf/seq_len"] == r["step"] and r["perf/oom"] == 0
        assert 0 < r["perf/fwd_ms"] and 0 < r["perf/fwd_bwd_ms"]
        assert 0 < r["perf/fwd_peak_mib"] < r["perf/fwd_bwd_peak_mib"]


def test_live_tensor_bytes_counts_storages_once_and_frees():
    tracker = LiveTensorBytes()
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10].view(2, 5)  # shares a's storage
        a.add_(1)  # in place: no new storage
        b = a * 2  # 4000 more
        assert tracker.live == 8000 and tracker.peak == 8000
        del a
        assert tracker.live == 8000  # the view keeps the storage alive
        del view, b
        assert tracker.live == 0
        torch.zeros(250)  # 1000 bytes, freed at once
    assert tracker.peak == 8000 and tracker.live == 0


def mixer_peaks(method, length, **knobs):
    torch.manual_seed(0)
    mixer = build(make_config(method, causal=True, **knobs), 64)
    x = torch.randn(2, length, 64, requires_grad=True)
    return peak_mib(forward_only(mixer, x), CPU), peak_mib(forward_and_backward(mixer, x), CPU)


def test_memory_grows_quadratically_for_dense_and_linearly_for_linear_attention():
    eager = [mixer_peaks("softmax", t, kernel="eager") for t in (128, 256)]
    linear = [mixer_peaks("linear", t) for t in (128, 256)]
    for i in (0, 1):  # forward, forward + backward
        assert 3.2 < eager[1][i] / eager[0][i] < 4.4  # (B, H, T, T) scores dominate
        assert 1.6 < linear[1][i] / linear[0][i] < 2.4
    # the materialised scores alone: 2 x 4 heads x 256 x 256 float32 = 2 MiB per tensor
    assert eager[1][0] > 2.0


def test_out_of_memory_stops_the_curve(monkeypatch):
    task, _ = build_task(merge(DEFAULTS, SMOKE))
    real = task.measure

    def measure(length, device):
        if length == 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(length, device)

    monkeypatch.setattr(task, "measure", measure)
    reporter = LocalReporter(quiet=True)
    last = task.run(reporter, CPU)
    assert [h["step"] for h in reporter.history] == [16, 32]
    assert reporter.history[-1]["perf/oom"] == 1.0 and last["perf/seq_len"] == 16


def test_block_scope_measures_transformer_blocks():
    reporter = LocalReporter(quiet=True)
    mixer = WORKLOAD.train(merge(DEFAULTS, SMOKE), LocalReporter(quiet=True))
    block = WORKLOAD.train(merge(DEFAULTS, merge(SMOKE, {"model": {"scope": "block", "depth": 2}})),
                                reporter)
    assert block["params/total"] > 2 * mixer["params/total"]  # two blocks: mixer, norms and MLP each


def test_validation_builds_the_longest_on_meta():
    task, _ = build_task(merge(DEFAULTS, {"attn": {"method": "topk", "k": 64}}), validate_only=True)
    with torch.device("meta"):
        assert next(task.build_model().parameters()).is_meta


@pytest.mark.parametrize("override, field", [
    ({"data": {"lengths": [512, 256]}}, r"data\.lengths: got \(512, 256\)"),
    ({"data": {"lengths": []}}, r"data\.lengths"),
    ({"data": {"lengths": [0, 8]}}, r"data\.lengths"),
    ({"data": {"dtype": "float8"}}, r"data\.dtype: got 'float8'"),
    ({"data": {"repeats": 0}}, r"data\.repeats: got 0"),
    ({"model": {"scope": "layer"}}, r"model\.scope: got 'layer'"),
    ({"attn": {"method": "topk", "k": 300}}, r"topk\.k: got 300 for sequences of 256"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        build_task(merge(DEFAULTS, override), validate_only=True)
