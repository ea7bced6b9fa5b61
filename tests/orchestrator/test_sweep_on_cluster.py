"""Sweeps against a running Ray head: ASHA stops bad trials early, an interrupted sweep resumes with
--resume and every trial ends finished once, and `ray job submit -- python -m orchestrator.sweep` works."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.orchestrator.conftest import REPO, run_sweep
from tests.orchestrator.raycluster import RayHead

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def head():
    h = RayHead(num_cpus=2)
    yield h
    h.stop()


def _children(db: str, sweep: str):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_asha_stops_the_trials_that_fall_behind(head, tmp_path):
    # two learning rates, one far too small: ASHA must cut those trials at a rung
    run_sweep(["colt5", "--smoke", "--address", head.address, "--set", "train.steps=24",
               'train.lr={"grid_search": [0.003, 1e-6]}'], tmp_path)
    client, parents, children = _children(tmp_path / "runs" / "mlflow.db", "colt5")
    assert len(parents) == 1 and len(children) == 4
    stopped = [c for c in children if c.data.tags.get("stopped_early") == "true"]
    assert stopped, "ASHA stopped no trial"
    # Tune starts the good learning rates first (the grid's last axis varies slowest), so the bad ones
    # reach each rung behind them and are cut there
    bad = [c for c in children if float(c.data.params["train.lr"]) == 1e-6]
    assert all(c in stopped for c in bad)
    for c in stopped:
        assert int(c.data.tags["stopped_at_step"]) < 24  # cut before the end
        assert {a.path for a in client.list_artifacts(c.info.run_id)} >= {"best_checkpoint", "config.json"}


def test_an_interrupted_sweep_resumes_and_finishes_every_trial_once(head, tmp_path):
    # long enough trials (a few seconds each) that the kill lands inside the second one
    args = ["topk", "--smoke", "--address", head.address, "--max-concurrent", "1",
            "--set", "train.steps=1500", "train.eval_every=100", "train.log_every=50"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    db = tmp_path / "runs" / "mlflow.db"
    # kill the sweep's driver once the first trial has finished and the second has logged something
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.5)
        if db.exists():
            client, parents, children = _children(db, "topk") if _has_experiment(db, "topk") else (None, [], [])
            finished = [c for c in children if c.info.status == "FINISHED"]
            if finished and len(children) == 2:
                second = [c for c in children if c.info.status == "RUNNING"]
                if second and client.get_metric_history(second[0].info.run_id, "train/loss"):
                    break
    else:
        proc.kill()
        pytest.fail("the sweep never reached its second trial:\n" + proc.communicate()[0][-3000:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_finished = {c.info.run_id: c.info.end_time for c in finished}

    out = run_sweep([*args, "--resume"], tmp_path)
    client, parents, children = _children(db, "topk")
    assert len(parents) == 1, "resume must continue the same parent run"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children), out.stdout[-2000:]
    assert len({c.data.tags["trial_id"] for c in children}) == 2
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), "a step was logged twice"
        if c.data.tags.get("stopped_early") == "true":  # ASHA may still cut the worse of the two
            assert int(c.data.tags["stopped_at_step"]) < 1500
        else:
            assert max(steps) == 1500
        if c.info.run_id in first_finished:  # finished before the kill: not run again
            assert c.info.end_time == first_finished[c.info.run_id]


def _has_experiment(db, name) -> bool:
    try:
        return MlflowClient(f"sqlite:///{db}").get_experiment_by_name(name) is not None
    except Exception:
        return False


def test_ray_job_submit_runs_the_sweep(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**head.env, "RAY_ADDRESS": head.dashboard}
    ray_cli = head.ray
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git", "*.pyc"],
                                           "env_vars": {"ATTNLAB_GIT_SHA": "test-sha"}}),
         "--", sys.executable, "-m", "orchestrator.sweep", "colt5", "--smoke", "--executor", "train",
         "--tracking-uri", tracking, "--storage", str(tmp_path / "ray")],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = JobSubmissionClient(head.dashboard).list_jobs()
    assert jobs and jobs[-1].status == JobStatus.SUCCEEDED
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("colt5")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["git_sha"] == "test-sha"
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    # the TorchTrainer path: the workers' reporter logs the same contract
    for c in children:
        assert client.get_metric_history(c.info.run_id, "val/bpc") and c.data.metrics["perf/startup_s"] > 0
        assert "best_checkpoint" in {a.path for a in client.list_artifacts(c.info.run_id)}


def test_a_trial_can_train_data_parallel_on_two_workers(head, tmp_path):
    run_sweep(["topk", "--smoke", "--address", head.address, "--workers-per-trial", "2"], tmp_path)
    client, parents, children = _children(tmp_path / "runs" / "mlflow.db", "topk")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        assert c.data.metrics["perf/workers"] == 2.0
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), "only rank 0 logs"


@pytest.mark.parametrize("executor", ["inline", "train"])
def test_a_crashed_trial_is_retried_from_its_last_checkpoint(head, tmp_path, executor):
    marker = tmp_path / "failed-once"
    run_sweep(["topk", "--smoke", "--address", head.address, "--executor", executor, "--max-concurrent", "1",
               "--set", "attn.method=topk", "attn.k=4", "train.steps=16", "train.eval_every=4", "train.log_every=2"],
              tmp_path, env={"ATTNLAB_FAIL_ONCE": f"10:{marker}"})
    assert marker.exists(), "the failure was injected"
    client, parents, children = _children(tmp_path / "runs" / "mlflow.db", "topk")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), "a retried step was logged twice"
        assert sorted(steps) == list(range(2, 17, 2))
