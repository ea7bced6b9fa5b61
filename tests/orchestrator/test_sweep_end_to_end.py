"""The README's main job at smoke size, embedded (a local Ray started by the sweep, MLflow in sqlite),
read back with the MLflow client: a parent run per sweep and a child run per trial carrying the metrics
contract's tags, params and per-step metrics."""

import json

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
        proc = run_sweep(["colt5", "--smoke"], workdir, timeout=300)
    finally:
        record.write_text(before) if before is not None else record.unlink(missing_ok=True)
    return workdir, proc


def test_prints_the_comparison_table_and_the_mlflow_ui_command(smoke_sweep):
    workdir, proc = smoke_sweep
    out = proc.stdout
    assert "sweep colt5" in out and "val/bpc" in out
    assert "softmax" in out and "colt5" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir}/runs/mlflow.db" in out
    # the CLI leaves without Python's teardown, after the atexit handlers: nothing half-torn-down to report
    # (gc.freeze() instead made Triton's bindings print hundreds of "leaked" lines)
    assert proc.returncode == 0 and "leaked" not in proc.stderr


def test_mlflow_holds_a_parent_run_with_children(smoke_sweep):
    workdir, _ = smoke_sweep
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    exp = client.get_experiment_by_name("colt5")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    for tag in ("sweep", "git_sha", "ray_version", "cluster"):
        assert parent.data.tags.get(tag), tag
    assert parent.data.tags["sweep"] == "colt5" and parent.info.status == "FINISHED"
    # where the sweep's own time went, phase by phase, each a positive duration
    phases = ("perf/process_start_to_ray_s", "perf/ray_to_trials_s", "perf/trials_s", "perf/report_s")
    assert all(parent.data.metrics.get(k, -1) >= 0 for k in phases), parent.data.metrics
    assert parent.data.metrics["perf/trials_s"] > parent.data.metrics["perf/ray_to_trials_s"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.tags["method"] for c in children) == ["colt5", "softmax"]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.csv", "comparison/comparison.md"} <= parent_artifacts

    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["workload"] == "lm" and tags["trial_id"]
        assert params["attn.method"] == tags["method"]
        assert params["seed"] == "0" and float(params["train.lr"]) > 0 and params["data.sha256"]
        if tags["method"] == "colt5":
            assert params["attn.window_routed_q"] == "4" and params["attn.router_iters"] == "10"
        # per-step metrics with explicit steps, no step logged twice
        loss = client.get_metric_history(child.info.run_id, "train/loss")
        steps = [m.step for m in loss]
        assert len(steps) >= 2 and len(set(steps)) == len(steps) and min(steps) >= 1
        for key in ("val/loss", "val/bpc", "perf/tokens_per_s", "perf/step_ms", "perf/peak_mem_mib",
                    "params/trainable", "params/total"):
            assert client.get_metric_history(child.info.run_id, key), key
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

    runs_page = f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs"
    dom = dump_dom(runs_page)
    assert parent.info.run_name in dom, "the runs table shows the sweep's parent run"

    ids = ",".join(f"%22{c.info.run_id}%22" for c in children)
    compare = f"{mlflow_ui}/#/compare-runs?runs=%5B{ids}%5D&experiments=%5B%22{exp.experiment_id}%22%5D"
    wanted = ["Comparing 2 Runs", "attn.method"] + [c.info.run_name for c in children]
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
