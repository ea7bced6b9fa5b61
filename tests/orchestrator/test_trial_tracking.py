"""TrialTracking: a trial's MLflow traffic on its own thread, opened only when training starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.trial_tracking import TrialTracking

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("t")


def test_queued_points_land_once_and_a_retry_skips_what_its_previous_attempt_logged(store):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    for step in range(1, 6):  # a previous attempt logged steps 1..5, then crashed
        tracking.log_metrics(client, run_id, {"train/loss": 10.0 - step}, step)
    opened = []
    tracker = TrialTracking(uri, lambda c: opened.append(c) or run_id, system_metrics=False)
    for step in range(3, 9):  # the retry restarts from a checkpoint at step 2
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.log_params({"data.sha256": "abc"})
    assert not opened  # nothing opened before training starts
    tracker.start()
    for step in range(9, 11):
        tracker.log_metrics({"train/loss": float(step), "perf/step_ms": 1.0}, step)
    got_client, got_run = tracker.close()
    assert got_run == run_id and len(opened) == 1
    history = {m.step: m.value for m in got_client.get_metric_history(run_id, "train/loss")}
    assert history == {**{s: 10.0 - s for s in range(1, 6)}, **{s: float(s) for s in range(6, 11)}}
    assert [m.step for m in got_client.get_metric_history(run_id, "perf/step_ms")] == [9, 10]
    assert got_client.get_run(run_id).data.params == {"data.sha256": "abc"}


def test_flush_returns_once_every_queued_point_is_in_the_store(store):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    tracker = TrialTracking(uri, lambda c: run_id, system_metrics=False)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.log_metrics({"val/loss": 2.0}, 1)
    tracker.flush()  # an evaluation point, about to go to Tune: ASHA may stop the trial right after
    assert client.get_run(run_id).data.metrics == {"train/loss": 1.0, "val/loss": 2.0}
    tracker.close()


def test_close_opens_the_run_even_if_training_never_started(store):
    uri, client, exp = store
    tracker = TrialTracking(uri, lambda c: c.create_run(exp).info.run_id, system_metrics=False)
    got_client, run_id = tracker.close()
    assert got_client.get_run(run_id).info.status == "RUNNING"  # the sweep marks it failed or finished


def test_a_tracking_failure_fails_the_trial_instead_of_passing_silently(store):
    uri, _, _ = store

    def broken(client):
        raise ValueError("no such parent run")

    tracker = TrialTracking(uri, broken, system_metrics=False)
    tracker.start()
    deadline = time.time() + 30
    while tracker._error is None and time.time() < deadline:  # the thread fails, then waits for close()
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match=r"tracking the trial in MLflow \(sqlite:.*\) failed: .*no such parent run"):
        tracker.log_metrics({"train/loss": 1.0}, 1)
    assert tracker.close(raise_errors=False) == (None, None)  # beside the workload's own error: quiet
    with pytest.raises(RuntimeError, match="no such parent run"):
        tracker.close()


def test_mlflow_is_not_imported_before_training_starts(tmp_path):
    code = """
import sys
from orchestrator.executors import run_trial_inline
from orchestrator.reporters import InlineReporter, TrainWorkerReporter
from orchestrator.trial_tracking import TrialTracking
tracker = TrialTracking("sqlite:///unused.db", lambda c: "run")
tracker.log_metrics({"perf/startup_s": 1.0}, 0)
print("mlflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


def _mlflow_server(db: Path, port: int) -> subprocess.Popen:
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(url: str, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server at {url} did not come up")


@pytest.mark.slow
def test_points_logged_while_the_mlflow_server_is_down_land_once_it_is_back(tmp_path):
    """A real `mlflow server`, SIGKILLed while a trial logs and restarted seconds later on the same port:
    every point lands, none twice, and the training loop never waits on the dead server."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, db = f"http://127.0.0.1:{port}", tmp_path / "server.db"
    server = _mlflow_server(db, port)
    try:
        _wait_for(url)
        client = MlflowClient(url)
        run_id = client.create_run(client.create_experiment("t")).info.run_id
        tracker = TrialTracking(url, lambda c: run_id, system_metrics=False)
        tracker.start()
        for step in range(1, 6):
            tracker.log_metrics({"train/loss": float(step)}, step)
        tracker.flush()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        started = time.time()
        for step in range(6, 31):  # the loop goes on while nothing answers
            tracker.log_metrics({"train/loss": float(step)}, step)
        assert time.time() - started < 1.0
        time.sleep(5)  # the client retries with backoff meanwhile
        server = _mlflow_server(db, port)
        _wait_for(url)
        tracker.close()
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 31))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
