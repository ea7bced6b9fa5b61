"""A sweep's bookkeeping against a real sqlite MLflow store: unique ids, the lock, which trials a resume
must leave alone, how each run is closed, and where results go."""

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from attention.config import ConfigError
from orchestrator import lifecycle, locations, tracking
from orchestrator.spec import load_sweep, param_space, parse_overrides


def test_sweeps_started_in_the_same_second_get_their_own_ids():
    ids = {lifecycle.new_sweep_id("colt5") for _ in range(50)}
    assert len(ids) == 50
    assert len({i.rsplit("-", 1)[0] for i in ids}) <= 2  # the same second (or two), still distinct


def test_a_second_process_cannot_take_a_sweeps_lock(tmp_path):
    where = locations.resolve(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "ray"))
    code = ("import sys, time; from orchestrator import lifecycle, locations; "
            f"w = locations.resolve('sqlite:///{tmp_path}/mlflow.db', '{tmp_path}/ray'); "
            "lifecycle.SweepLock(w, 'colt5-x').acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"'colt5-x' is being run by pid \d+ on"):
            lifecycle.SweepLock(where, "colt5-x").acquire()
        holder.kill()  # the kernel drops a dead process's lock: the sweep can be resumed again
        holder.wait()
        lock = lifecycle.SweepLock(where, "colt5-x").acquire()
        with open(lock.path) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.release()
    finally:
        holder.kill()


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.create_sqlite_store(uri)
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "topk", None)
    parent = tracking.create_parent_run(client, exp, "topk", "topk-1", {})

    def child(trial, status="RUNNING", **tags):
        run_id, _ = tracking.get_or_create_child_run(client, parent, trial, {"attn": {"method": "topk"}}, 0)
        if tags:
            tracking.set_tags(client, run_id, tags)
        if status != "RUNNING":
            client.set_terminated(run_id, status=status)
        return run_id

    return client, parent, child


def test_a_resume_leaves_finished_stopped_and_diverged_trials_alone(store):
    client, parent, child = store
    child("t-finished", "FINISHED")
    stopped = child("t-stopped", stopped_early="true", stopped_at_step="6")  # the driver died before closing it
    child("t-diverged", "FAILED", diverged="true", diverged_at_step="2")
    interrupted = child("t-interrupted", "KILLED", interrupted="true")
    child("t-crashed", "FAILED")
    done = lifecycle.done_trials(tracking.child_runs(client, parent))
    assert done == {"t-finished", "t-stopped", "t-diverged"}

    # a done trial's run is found again as it is; an interrupted one runs again, its mark gone
    run_id, _ = tracking.get_or_create_child_run(client, parent, "t-stopped", {}, 0, revive=False)
    assert run_id == stopped
    run_id, finished = tracking.get_or_create_child_run(client, parent, "t-interrupted", {}, 0)
    assert run_id == interrupted and not finished
    run = client.get_run(interrupted)
    assert run.info.status == "RUNNING" and "interrupted" not in run.data.tags


@pytest.mark.parametrize("interrupted", [True, False])
def test_runs_are_closed_by_how_their_trial_ended(store, interrupted):
    client, parent, child = store
    child("done", "FINISHED")  # a trial that ends by itself closes its own run
    ids = {t: child(t) for t in ("cut", "crashed", "cut-short")}
    tracking.set_tags(client, ids["cut"], {"stopped_early": "true"})
    child("diverged", "FAILED", diverged="true")
    summary = lifecycle.close_trial_runs(client, parent, interrupted, errored={"crashed"}, trials=6, checkpoints={})
    status = {t: client.get_run(i).info.status for t, i in ids.items()}
    # a run left RUNNING without a reason is the interruption's, or (without one) a trial that broke
    assert status == {"cut": "FINISHED", "crashed": "FAILED", "cut-short": "KILLED" if interrupted else "FAILED"}
    assert (client.get_run(ids["cut-short"]).data.tags.get("interrupted") == "true") == interrupted
    assert (summary.finished, summary.stopped, summary.diverged, summary.not_started) == (1, 1, 1, 1)
    assert (summary.failed, summary.interrupted) == ((1, 1) if interrupted else (2, 0))
    if interrupted:
        assert summary.line() == ("6 trials: 1 finished, 1 stopped early, 1 diverged, 1 failed, 1 interrupted, "
                                  "1 not started")


def test_set_accepts_top_level_values_and_grids():
    assert parse_overrides(["seed=3", "train.steps=10"]) == {"seed": 3, "train": {"steps": 10}}
    space = param_space(load_sweep("topk"), "smoke", overrides=parse_overrides(['seed={"grid_search": [0, 1]}']))
    assert space["seed"] == {"grid_search": [0, 1]}
    with pytest.raises(ConfigError, match="--set workload: .* chooses its workload with --workload"):
        param_space(load_sweep("topk"), "smoke", overrides={"workload": "mqar"})


def test_results_go_where_the_tracking_uri_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(locations.RAY_JOB_ENV, raising=False)
    where = locations.resolve(None, None)
    assert where.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db" and where.note is None
    assert where.storage == str(tmp_path / "runs" / "ray")
    assert where.artifact_root == (tmp_path / "runs" / "mlflow-artifacts").as_uri()
    # the artifacts live beside the store the user named, not under the current folder
    elsewhere = locations.resolve("sqlite:////srv/lab/mlflow.db", None)
    assert elsewhere.artifact_root == "file:///srv/lab/mlflow-artifacts"
    assert locations.resolve("http://mlflow:5000", None).artifact_root is None


def test_inside_a_ray_job_results_go_to_a_per_user_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(locations.RAY_JOB_ENV, "{}")
    monkeypatch.setenv("ATTNLAB_HOME", str(tmp_path / "home"))
    where = locations.resolve(None, None)
    assert where.tracking_uri == f"sqlite:///{tmp_path}/home/runs/mlflow.db"
    assert where.storage == str(tmp_path / "home" / "runs" / "ray")
    assert str(tmp_path / "home" / "runs") in where.note
    assert locations.resolve("sqlite:////x/m.db", "/x/ray").note is None  # both chosen: nothing to say


def test_the_writability_check_leaves_nothing_behind(tmp_path):
    locations.check_storage(str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []
    started = time.time()
    with pytest.raises(ConfigError, match="no MLflow server answers"):
        locations.check_tracking_uri("http://127.0.0.1:9")
    assert time.time() - started < locations.REACH_TIMEOUT_S + 2
