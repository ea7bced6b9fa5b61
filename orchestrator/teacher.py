"""Find a trained teacher in MLflow: the best trial of a method (softmax by default) in a sweep, and its
`best_checkpoint/state.pt` artifact (logged by orchestrator.executors), ready for the `distill` workload.

    ref = find_best_teacher("sqlite:///runs/mlflow.db", sweep="softmax")
    config = merge(distill.DEFAULTS, distill_overrides(ref))      # teacher_checkpoint, heads, seq_len

Child runs carry the tags `sweep` and `method` (orchestrator.tracking); the best is the one whose best
logged value of the quality metric is lowest (mode 'min') or highest ('max').
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

CHECKPOINT_ARTIFACT = "best_checkpoint/state.pt"


@dataclasses.dataclass(frozen=True)
class TeacherRef:
    run_id: str
    checkpoint: str          # local path of the downloaded state.pt
    config: dict[str, Any]   # the teacher trial's resolved config (its config.json artifact), {} if absent
    metric: str
    value: float             # the run's best value of `metric`


def _best_value(client, run_id: str, metric: str, mode: str) -> float:
    values = [m.value for m in client.get_metric_history(run_id, metric) if math.isfinite(m.value)]
    if not values:
        return math.nan
    return min(values) if mode == "min" else max(values)


def find_best_teacher(tracking_uri: str, sweep: str, *, method: str = "softmax", metric: str = "val/bpc",
                      mode: str = "min", sweep_id: str | None = None, experiment: str | None = None,
                      dest: str | None = None) -> TeacherRef:
    """The best `method` trial of sweep `sweep` (optionally one run of it, `sweep_id`) that has a
    checkpoint artifact; downloads its state.pt (and config.json) under `dest` (a new temp dir by default).
    Raises LookupError naming what was searched when nothing matches."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode: got {mode!r}, allowed: 'min', 'max'")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise LookupError(f"experiment {experiment!r} not found at {tracking_uri}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.sweep = '{sweep}' and tags.method = '{method}'"
    runs = client.search_runs(experiment_ids, filter_string=query, max_results=10000)
    runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # trials, not the sweep's parent run
    if sweep_id is not None:
        parents = client.search_runs(experiment_ids, filter_string=f"tags.sweep_id = '{sweep_id}'", max_results=1)
        parent_ids = {p.info.run_id for p in parents}
        runs = [r for r in runs if r.data.tags["mlflow.parentRunId"] in parent_ids]
    scored = []
    for run in runs:
        value = _best_value(client, run.info.run_id, metric, mode)
        if math.isfinite(value) and any(a.path == "best_checkpoint" for a in client.list_artifacts(run.info.run_id)):
            scored.append((value if mode == "min" else -value, run.info.run_id, value))
    if not scored:
        where = f"sweep {sweep!r}" + (f" (sweep_id {sweep_id!r})" if sweep_id else "")
        raise LookupError(f"no {method!r} trial of {where} with metric {metric!r} and a {CHECKPOINT_ARTIFACT} "
                          f"artifact at {tracking_uri} ({len(runs)} {method!r} trial(s) found)")
    _, run_id, value = min(scored)
    dest = dest or tempfile.mkdtemp(prefix="attnlab-teacher-")
    import mlflow.artifacts

    checkpoint = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT,
                                                     dst_path=dest, tracking_uri=tracking_uri)
    config: dict[str, Any] = {}
    if any(a.path == "config.json" for a in client.list_artifacts(run_id)):
        config = json.loads(Path(client.download_artifacts(run_id, "config.json", dest)).read_text())
    return TeacherRef(run_id, str(checkpoint), config, metric, value)


def distill_overrides(ref: TeacherRef) -> dict[str, Any]:
    """The part of a `distill` trial config that points at this teacher: its checkpoint, its heads and
    its sequence length (the student's sizes are read from the checkpoint itself)."""
    attn = ref.config.get("attn", {})
    out: dict[str, Any] = {"distill": {"teacher_checkpoint": ref.checkpoint, "mode": "distill"}}
    if "heads" in attn:
        out["distill"]["teacher_heads"] = int(attn["heads"])
    seq_len = ref.config.get("data", {}).get("seq_len")
    if seq_len:
        out["data"] = {"seq_len": int(seq_len)}
    return out
