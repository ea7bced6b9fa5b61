"""The README's main job at smoke size, embedded (a local Ray started by the sweep, MLflow in sqlite), with
2 methods x 2 seeds, FIFO: the table reports mean ± std at a common step and Δ against softmax; MLflow
holds a parent run per sweep and a child run per trial carrying the metrics contract's tags, params and
per-step metrics; the printed URL opens the runs table, which shows the trials by name."""

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from tests.orchestrator.conftest import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    from pathlib import Path

    workdir = tmp_path_factory.mktemp("colt5-smoke")
    # A dead cluster recorded by an earlier `ray start` must not capture the embedded sweep (a bare
    # ray.init() attaches to it and hangs): record one, run, put back what was there.
    record = Path("/tmp/ray/ray_current_cluster")
    before = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("127.0.0.1:1")
    try:
        proc = run_sweep(["colt5", "--smoke", "--seeds", "0,1"], workdir)
    finally:
        record.write_text(before) if before is not None else record.unlink(missing_ok=True)
    return workdir, proc


def test_prints_a_table_at_a_common_step_with_seeds_and_delta(smoke_sweep):
    workdir, proc = smoke_sweep
    out = proc.stdout
    assert proc.returncode == 0 and "leaked" not in proc.stderr
    assert "sweep colt5" in out and "val/bpc @ 12" in out and "Δ vs softmax [95% CI]" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert set(rows) == {"softmax (baseline)", "colt5"}, rows
    for row in rows.values():  # n = 2 seeds, mean ± std
        assert re.search(r"│ 2 │ +\d\.\d+ ± \d\.\d+", row), row
    assert re.search(r"[+−]\d\.\d+ \[[−+]\d\.\d+, [−+]\d\.\d+\]", rows["colt5"]), rows["colt5"]
    assert "read at step 12" in out
    # a smoke run is too small to learn: the report says so, against the validation text's bigram floor
    assert "this sweep compares untrained models" in out and "bigram" in out
    assert "n/a (CPU)" in out  # no per-trial memory figure on the CPU (the process's grew with each trial)
    exp_id = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db").get_experiment_by_name("colt5").experiment_id
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir}/runs/mlflow.db" in out
    assert f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs" in out
    # one line a trial on the console, not Tune's tables or the actors' log lines
    assert "Trial status" not in out + proc.stderr and "INFO" not in out + proc.stderr
    assert len((out + proc.stderr).splitlines()) < 60


def test_mlflow_holds_a_parent_run_with_children(smoke_sweep):
    workdir, _ = smoke_sweep
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    exp = client.get_experiment_by_name("colt5")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    for tag in ("sweep", "git_sha", "ray_version", "cluster"):
        assert parent.data.tags.get(tag), tag
    assert parent.data.tags["sweep"] == "colt5" and parent.info.status == "FINISHED"
    assert parent.data.tags["scheduler"] == "fifo" and parent.data.tags["baseline"] == "softmax"
    floors = json.loads(parent.data.tags["floors"])
    assert floors[0]["name"] == "bigram" and 2 < floors[0]["value"] < 5
    assert parent.data.metrics["floor/bigram"] == floors[0]["value"]
    assert "Δ vs softmax" in parent.data.tags["mlflow.note.content"]  # the description holds the table
    # where the sweep's own time went, phase by phase, each a positive duration
    phases = ("perf/process_start_to_ray_s", "perf/ray_to_trials_s", "perf/trials_s", "perf/report_s")
    assert all(parent.data.metrics.get(k, -1) >= 0 for k in phases), parent.data.metrics
    assert parent.data.metrics["perf/trials_s"] > parent.data.metrics["perf/ray_to_trials_s"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == ["colt5 s0", "colt5 s1", "softmax s0", "softmax s1"]
    assert sorted(c.data.tags["method"] for c in children) == ["colt5", "colt5", "softmax", "softmax"]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.csv", "comparison/comparison.md"} <= parent_artifacts

    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["workload"] == "lm" and tags["trial_id"] and tags["config"] == tags["method"]
        assert params["attn.method"] == tags["method"]
        assert params["seed"] == tags["seed"] and tags["seed"] in ("0", "1")
        assert float(params["train.lr"]) > 0 and params["data.sha256"]
        if tags["method"] == "colt5":
            assert params["attn.window_routed_q"] == "4" and params["attn.router_iters"] == "10"
        # per-step metrics with explicit steps, no step logged twice
        loss = client.get_metric_history(child.info.run_id, "train/loss")
        steps = [m.step for m in loss]
        assert len(steps) >= 2 and len(set(steps)) == len(steps) and min(steps) >= 1
        for key in ("val/loss", "val/bpc", "perf/tokens_per_s", "perf/step_ms", "params/trainable", "params/total"):
            assert client.get_metric_history(child.info.run_id, key), key
        # identical configs in sequence in one reused actor: no CPU memory figure that grows with trial order
        assert "perf/peak_mem_mib" not in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "config.json" in artifacts and "best_checkpoint" in artifacts
        config = json.loads(open(client.download_artifacts(child.info.run_id, "config.json",
                                                           str(workdir))).read())
        assert config["attn"]["method"] == tags["method"]
        assert child.info.status == "FINISHED"


@pytest.fixture(scope="module")
def mlflow_ui(smoke_sweep):
    """`mlflow server` on the sweep's sqlite store, as the sweep's closing line tells a user to open it."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    workdir, _ = smoke_sweep
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", f"sqlite:///{workdir}/runs/mlflow.db",
         "--default-artifact-root", f"file://{workdir}/runs/mlflow-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**__import__("os").environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("mlflow server did not come up")
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_mlflow_ui_shows_the_sweep_and_compares_its_trials(smoke_sweep, mlflow_ui):
    from tests.orchestrator.browser import dump_dom, screenshot

    workdir, _ = smoke_sweep
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    exp = client.get_experiment_by_name("colt5")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]

    # the URL the sweep prints opens the runs table (not MLflow 3's GenAI overview)
    runs_page = f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs"
    for _ in range(3):  # the page fetches runs after it loads; a busy machine may need another look
        dom = dump_dom(runs_page)
        if parent.info.run_name in dom:
            break
    assert parent.info.run_name in dom, "the runs table shows the sweep's parent run"
    assert "Training runs" in dom, "the model training runs table, not the GenAI overview"
    shot = workdir / "mlflow-runs.png"
    screenshot(runs_page, str(shot))

    ids = ",".join(f"%22{c.info.run_id}%22" for c in children)
    compare = f"{mlflow_ui}/#/compare-runs?runs=%5B{ids}%5D&experiments=%5B%22{exp.experiment_id}%22%5D"
    wanted = ["Comparing 4 Runs", "attn.method"] + [c.info.run_name for c in children]
    for _ in range(3):  # the page fetches runs after it loads; a busy machine may need another look
        dom = dump_dom(compare)
        missing = [w for w in wanted if w not in dom]
        if not missing:
            break
    assert not missing, f"the compare view lacks {missing}"

    shot = workdir / "mlflow-compare.png"
    screenshot(compare, str(shot))
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1400, 900)
    low, high = image.getextrema()
    assert high - low > 100, "the screenshot is blank"
