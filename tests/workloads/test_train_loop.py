"""The shared training loop: real data lowers the loss, a resumed run continues the same curve, and
bad config values fail naming the field."""

import math
import os
import subprocess
import sys

import pytest

from attention.config import ConfigError
from workloads.common import scratch
from workloads.common.report import LocalReporter
from workloads.common.train import TrainConfig, TrainingDiverged
from workloads.contract import merge
from workloads.lm import DEFAULTS, SMOKE, WORKLOAD, build_task


def _config(**train):
    return merge(merge(DEFAULTS, SMOKE), {"train": train})


def test_short_run_on_real_text_lowers_the_loss(tmp_path):
    reporter = LocalReporter(tmp_path, quiet=True)
    final = WORKLOAD.train(_config(steps=60, eval_every=30, log_every=10, lr=3e-3), reporter)
    losses = [h["train/loss"] for h in reporter.history]
    assert losses[-1] < losses[0] - 0.8, losses  # from ~5.5 nats (uniform over 256 bytes) downwards
    assert final["val/bpc"] < 6.5 and math.isclose(final["val/bpc"], final["val/loss"] / math.log(2))


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    config = _config(steps=16, eval_every=8, log_every=2)
    full = LocalReporter(tmp_path / "full", quiet=True)
    WORKLOAD.train(config, full)

    # The same run, killed at step 10 (after the step-8 checkpoint), then started again on its run dir
    crash = LocalReporter(tmp_path / "crash", quiet=True)
    original = crash.report

    class Killed(Exception):
        pass

    def report_then_die(metrics, step, checkpoint_dir=None, evaluation=False):
        original(metrics, step, checkpoint_dir)
        if step == 10:
            raise Killed

    crash.report = report_then_die
    with pytest.raises(Killed):
        WORKLOAD.train(config, crash)
    again = LocalReporter(tmp_path / "crash", quiet=True)  # what a new process sees
    assert again.resume_checkpoint_dir()
    WORKLOAD.train(config, again)

    first = {h["step"]: h["train/loss"] for h in full.history}
    after = {h["step"]: h["train/loss"] for h in again.history}
    assert min(after) == 10  # restarted after step 8, not from scratch
    for step in (10, 12, 14, 16):
        assert after[step] == pytest.approx(first[step], abs=1e-6), step
    assert again.history[-1]["val/loss"] == pytest.approx(full.history[-1]["val/loss"], abs=1e-6)


@pytest.mark.parametrize("section, values, field", [
    ("train", {"lr": -1}, "train.lr"),
    ("train", {"steps": 0}, "train.steps"),
    ("train", {"precision": "fp8"}, "train.precision"),
    ("train", {"nosuch": 1}, "nosuch"),
    ("model", {"depth": 0}, "model.depth"),
    ("data", {"source": "the_internet"}, "data.source"),
    ("data", {"seq_len": 1}, "data.seq_len"),
])
def test_bad_values_name_the_field(section, values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_task(merge(DEFAULTS, {section: values}), validate_only=True)


def test_train_config_defaults_are_valid():
    TrainConfig()


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path):
    # a weight decay that multiplies every weight by about -1e35 at the first step: the next loss is NaN
    reporter = LocalReporter(tmp_path, quiet=True)
    with pytest.raises(TrainingDiverged, match="diverged at step 2: train/loss = nan") as error:
        WORKLOAD.train(_config(steps=50, weight_decay=1e38, log_every=1), reporter)
    assert (error.value.step, error.value.metric) == (2, "train/loss")
    assert [h["step"] for h in reporter.history] == [1]  # nothing after it was trained or reported


def test_the_workload_cli_reports_divergence_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workloads.lm", "--smoke", "--train", "weight_decay=1e38",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "error: training diverged at step 2" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_checkpoint_on_its_way_to_a_stopping_reporter_is_removed(tmp_path, monkeypatch):
    """A scheduler stops a trial by raising out of its reporter: the checkpoint the loop made is removed."""
    monkeypatch.setenv("ATTNLAB_SCRATCH", str(tmp_path / "scratch"))

    class Stop(Exception):
        pass

    class StoppingReporter(LocalReporter):
        def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
            if checkpoint_dir:
                raise Stop
            super().report(metrics, step, checkpoint_dir)

    with pytest.raises(Stop):
        WORKLOAD.train(_config(steps=12), StoppingReporter(tmp_path / "run", quiet=True))
    assert list((tmp_path / "scratch").iterdir()) == []


def test_scratch_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_SCRATCH", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{dead.stdout.strip()}-best-abc"
    orphan.mkdir()
    mine = scratch.make("best")
    assert not orphan.exists() and os.path.isdir(mine)
    assert scratch.remove_orphans() == [] and os.path.isdir(mine)  # a live process keeps its own
