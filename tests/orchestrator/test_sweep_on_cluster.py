"""Sweeps against a running Ray head: ASHA stops bad trials early, an interrupted sweep resumes with
--resume and every trial ends finished once, trial actors killed by real signals resume from their
checkpoints, a diverged trial stops at once while the others go on, credentials never reach Ray's logs
or APIs, and `ray job submit -- python -m orchestrator.sweep` keeps its results where they last."""

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.orchestrator.conftest import (
    REPO,
    SWEEP_TIMEOUT_S,
    finish,
    leftovers,
    run_sweep,
    runs,
    start_sweep,
    steps_of,
    trials_training,
    wait_until,
)
from tests.orchestrator.raycluster import RayHead

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def head():
    h = RayHead(num_cpus=2)
    yield h
    h.stop()


def test_asha_stops_the_trials_that_fall_behind_but_never_the_baseline(head, tmp_path):
    # two learning rates, one far too small: ASHA must cut those trials at a rung, except the baseline's
    scratch, started = tmp_path / "scratch", time.time()  # ATTNLAB_ variables reach the cluster's workers
    run_sweep(["colt5", "--smoke", "--scheduler", "asha", "--address", head.address, "--set", "train.steps=24",
               'train.lr={"grid_search": [0.003, 1e-6]}'], tmp_path, env={"ATTNLAB_SCRATCH": str(scratch)})
    client, parents, children = runs(tmp_path / "runs" / "mlflow.db", "colt5")
    assert len(parents) == 1 and len(children) == 4 and parents[0].data.tags["scheduler"] == "asha"
    stopped = [c for c in children if c.data.tags.get("stopped_early") == "true"]
    assert stopped, "ASHA stopped no trial"
    # Tune starts the good learning rates first (the grid's last axis varies slowest), so the bad ones
    # reach each rung behind them and are cut there; the baseline (softmax) runs to the end even at 1e-6
    bad = [c for c in children if float(c.data.params["train.lr"]) == 1e-6]
    assert all(c in stopped for c in bad if c.data.tags["method"] == "colt5")
    for c in children:
        if c.data.tags["method"] == "softmax":
            assert c not in stopped and max(steps_of(client, c.info.run_id)) == 24
    for c in stopped:
        assert int(c.data.tags["stopped_at_step"]) < 24  # cut before the end
        assert {a.path for a in client.list_artifacts(c.info.run_id)} >= {"best_checkpoint", "config.json"}
    # a stopped trial's checkpoint on its way to Tune, and the trials' best copies: all removed
    assert leftovers(scratch, started) == []


def test_an_interrupted_sweep_resumes_and_finishes_every_trial_once(head, tmp_path):
    # long enough trials (a few seconds each) that the kill lands inside the second one
    args = ["topk", "--smoke", "--address", head.address, "--max-concurrent", "1",
            "--set", "train.steps=1500", "train.eval_every=100", "train.log_every=50"]
    db = tmp_path / "runs" / "mlflow.db"
    sweep = start_sweep(args, tmp_path)

    def second_trial_training():
        client, _, children = runs(db, "topk")
        finished = [c for c in children if c.info.status == "FINISHED"]
        return finished if finished and trials_training(db, "topk", 1) else None

    finished = wait_until(second_trial_training, sweep, what="the second trial training")
    sweep.kill()  # SIGKILL: no clean-up at all
    finish(sweep)
    first_finished = {c.info.run_id: c.info.end_time for c in finished}

    out = run_sweep([*args, "--resume"], tmp_path)
    client, parents, children = runs(db, "topk")
    assert len(parents) == 1, "resume must continue the same parent run"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children), out.stdout[-2000:]
    assert len({c.data.tags["trial_id"] for c in children}) == 2
    for c in children:
        steps = steps_of(client, c.info.run_id)
        assert len(steps) == len(set(steps)), "a step was logged twice"
        if c.data.tags.get("stopped_early") == "true":  # ASHA may still cut the worse of the two
            assert int(c.data.tags["stopped_at_step"]) < 1500
        else:
            assert max(steps) == 1500
        if c.info.run_id in first_finished:  # finished before the kill: not run again
            assert c.info.end_time == first_finished[c.info.run_id]


def test_sigterm_to_the_driver_interrupts_like_ctrl_c(head, tmp_path):
    """What `ray job stop` and a pod's end send: the state is saved, the runs stay resumable."""
    args = ["topk", "--smoke", "--address", head.address, "--set", "train.steps=1200", "train.eval_every=100",
            "train.log_every=50"]
    db = tmp_path / "runs" / "mlflow.db"
    sweep = start_sweep(args, tmp_path)
    wait_until(lambda: trials_training(db, "topk", 2), sweep, what="two trials training")
    sweep.send_signal(signal.SIGTERM)
    out = finish(sweep)
    assert sweep.returncode == 130 and "--resume topk-" in out, out[-3000:]
    client, parents, children = runs(db, "topk")  # resumable as after Ctrl-C (test_sweep_faults resumes one)
    assert parents[0].info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED", "KILLED"]
    assert all(c.data.tags["interrupted"] == "true" for c in children)


def _trial_actor(head: RayHead):
    """The process of the trial now training (Tune's function trainable runs in `ImplicitFunc.train`)."""
    actors = [p for p in head.processes() if p.cmdline()[:1] == ["ray::ImplicitFunc.train"]]
    return actors[0] if len(actors) == 1 else None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_trial_actor_resumes_from_its_checkpoint(head, tmp_path, sig):
    scratch, started = tmp_path / "scratch", time.time()
    args = ["topk", "--smoke", "--address", head.address, "--max-concurrent", "1", "--set", "attn.method=topk",
            "attn.k=4", "train.steps=300", "train.eval_every=50", "train.log_every=10"]
    db = tmp_path / "runs" / "mlflow.db"
    sweep = start_sweep(args, tmp_path, env={"ATTNLAB_SCRATCH": str(scratch)})

    def actor_past_its_first_checkpoint():
        found = trials_training(db, "topk", 1)
        if found and found[0].get_metric_history(found[1][0].info.run_id, "val/bpc"):
            return _trial_actor(head)
        return None

    actor = wait_until(actor_past_its_first_checkpoint, sweep, what="a trial past its first checkpoint")
    actor.send_signal(sig)
    out = finish(sweep)
    assert sweep.returncode == 0, out[-3000:]
    client, parents, children = runs(db, "topk")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        steps = steps_of(client, c.info.run_id)
        assert len(steps) == len(set(steps)), "a step was logged twice"
        assert max(steps) == 300
    # the killed actor could not remove its scratch copies: the next user of the folder did
    assert leftovers(scratch, started) == []


SECRETS = {"MLFLOW_TRACKING_PASSWORD": "attnlab-fake-secret-1", "HF_TOKEN": "attnlab-fake-secret-2",
           "ATTNLAB_API_KEY": "attnlab-fake-secret-3"}


@pytest.fixture(scope="module")
def diverging_sweep(head, tmp_path_factory):
    """Four trials, two of them with a weight decay that blows the weights up at the first step; the
    sweep's shell holds credentials that must not travel to the cluster."""
    workdir = tmp_path_factory.mktemp("diverging")
    proc = run_sweep(["softmax", "--smoke", "--address", head.address, "--set",
                      'train.weight_decay={"grid_search": [0.01, 1e38]}'], workdir, check=False,
                     env={**SECRETS, "ATTNLAB_HARMLESS": "forwarded"})
    return workdir, proc


def test_a_diverged_trial_stops_at_once_and_is_marked(diverging_sweep):
    workdir, proc = diverging_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 trials: " in proc.stdout and ", 2 diverged" in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("diverged @ 2") == 2, proc.stdout[-3000:]
    client, parents, children = runs(workdir / "runs" / "mlflow.db", "softmax")
    diverged = [c for c in children if c.data.params["train.weight_decay"] == "1e+38"]
    assert len(diverged) == 2
    for c in diverged:
        assert c.info.status == "FAILED" and c.data.tags["diverged"] == "true"
        assert c.data.tags["diverged_at_step"] == "2" and c.data.tags["diverged_metric"] == "train/loss"
        assert max(steps_of(client, c.info.run_id), default=0) < 3  # stopped at once, not run to the end
    for c in children:  # the others go on (to the end, or to where ASHA cut the worse of them)
        if c not in diverged:
            assert c.info.status == "FINISHED" and "diverged" not in c.data.tags
            assert max(steps_of(client, c.info.run_id)) == 12 or c.data.tags["stopped_early"] == "true"


def test_credentials_never_reach_the_clusters_logs_or_apis(head, diverging_sweep):
    workdir, proc = diverging_sweep
    assert "not passing ATTNLAB_API_KEY, HF_TOKEN, MLFLOW_TRACKING_PASSWORD to the cluster" in proc.stderr
    leaks = []
    for path in head.temp_dir.rglob("*"):
        if path.is_file() and not path.is_socket():
            try:
                text = path.read_bytes()
            except OSError:
                continue
            leaks += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in text]
    for api in ("/api/jobs/", "/api/v0/actors?detail=1", "/api/v0/tasks?detail=1"):
        text = urllib.request.urlopen(head.dashboard + api, timeout=30).read().decode()
        leaks += [f"{api}: {name}" for name, value in SECRETS.items() if value in text]
        if api == "/api/jobs/":
            assert "ATTNLAB_HARMLESS" in text, "the harmless settings are still passed on"
    assert leaks == []


def test_ray_job_submit_keeps_the_results_out_of_the_jobs_working_dir(head, tmp_path):
    """A job's working dir is deleted with Ray's session: with no location given, results go to the
    per-user folder ($ATTNLAB_HOME/runs, ~/.attnlab/runs by default), and the sweep says so."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    home = tmp_path / "home"
    env = {**head.env, "RAY_ADDRESS": head.dashboard}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ATTNLAB_STORAGE", None)
    proc = subprocess.run(
        [head.ray, "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git", "*.pyc", ".whl*", ".devwhl"],
                                           "env_vars": {"ATTNLAB_GIT_SHA": "test-sha", "ATTNLAB_HOME": str(home)}}),
         "--", sys.executable, "-m", "orchestrator.sweep", "colt5", "--smoke", "--executor", "train"],
        env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"results go to {home / 'runs'}" in proc.stdout + proc.stderr
    jobs = JobSubmissionClient(head.dashboard).list_jobs()
    assert jobs and jobs[-1].status == JobStatus.SUCCEEDED
    client = MlflowClient(f"sqlite:///{home / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("colt5")
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["git_sha"] == "test-sha"
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert any((home / "runs" / "ray").glob("colt5-*")), "the checkpoints and Tune state are kept there too"
    # the TorchTrainer path: the workers' reporter logs the same contract
    for c in children:
        assert client.get_metric_history(c.info.run_id, "val/bpc") and c.data.metrics["perf/startup_s"] > 0
        assert "best_checkpoint" in {a.path for a in client.list_artifacts(c.info.run_id)}


def test_a_trial_can_train_data_parallel_on_two_workers(head, tmp_path):
    run_sweep(["topk", "--smoke", "--address", head.address, "--workers-per-trial", "2"], tmp_path)
    client, parents, children = runs(tmp_path / "runs" / "mlflow.db", "topk")
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
    client, parents, children = runs(tmp_path / "runs" / "mlflow.db", "topk")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), "a retried step was logged twice"
        assert sorted(steps) == list(range(2, 17, 2))
