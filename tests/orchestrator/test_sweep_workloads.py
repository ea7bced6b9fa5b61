"""Every kind of workload runs under a sweep through the one contract: `speed` (measures, trains nothing:
its points are flagged as evaluation points, not recognised by a metric's name) and `distill` (a
teacher trained inside the trial, an extra config section). Each trial's MLflow params hold every
field of every section, defaults included."""

import dataclasses
import json
from pathlib import Path

import pytest

import attention
from tests.orchestrator.conftest import run_sweep, runs
from workloads import contract
from workloads.contract import flatten

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("sweep, workload, extra", [
    ("topk", "speed", []),
    ("sea", "distill", ["--set", "distill.teacher_steps=12"]),
])
def test_a_workload_runs_under_a_sweep(workdir, sweep, workload, extra):
    proc = run_sweep([sweep, "--smoke", "--workload", workload, "--max-concurrent", "1", *extra], workdir)
    assert "2 trials: " in proc.stdout and "failed" not in proc.stdout, proc.stdout[-3000:]
    client, parents, children = runs(workdir / "runs" / "mlflow.db", sweep)
    chosen = contract.get(workload)
    assert parents[0].data.tags["quality_metric"] == chosen.quality_metric
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["workload"] == workload
        history = client.get_metric_history(child.info.run_id, chosen.quality_metric)
        assert history, f"no {chosen.quality_metric} point reached MLflow"
        # every field of every section (the trial's method's own knobs among them), defaults included
        resolved = json.loads(Path(client.download_artifacts(child.info.run_id, "config.json", str(workdir)))
                              .read_text())
        for section, cls in chosen.sections.items():
            cls = attention.get(resolved["attn"]["method"]).config_cls if section == "attn" else cls
            fields = {f.name for f in dataclasses.fields(cls)} | ({"method"} if section == "attn" else set())
            assert set(resolved[section]) == fields, section
        missing = sorted(set(flatten(resolved)) - set(child.data.params) - {"workload"})
        assert missing == [], missing
    if workload == "speed":  # one point a length, step = the length
        lengths = contract.get("speed").smoke["data"]["lengths"]
        assert [m.step for m in history] == lengths
