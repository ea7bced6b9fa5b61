"""MLflow per the metrics contract: a parent run per sweep, a child run per trial.

Everything goes through `MlflowClient` with explicit run ids and steps (no global active run), so the
driver, the Ray Train workers and the report can each reach the right run from any process."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workloads.contract import flatten

if TYPE_CHECKING:  # MLflow itself is imported where it is used: importing it takes seconds
    from mlflow.tracking import MlflowClient

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def create_sqlite_store(tracking_uri: str) -> None:
    """Create a new sqlite tracking store whole: MLflow's schema migrations run on a file beside it,
    which is then renamed into place. Any process that opens the store while it is being created
    (`mlflow ui`, a second sweep, a reader polling for results) would otherwise run the same
    migrations on the half-migrated file, and both fail ("table _alembic_tmp_... already exists").
    Does nothing for an existing store or another backend."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return
    path = Path(tracking_uri[len(prefix):])
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.creating-{os.getpid()}")
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(f"{prefix}{tmp}").search_experiments(max_results=1)  # creates and migrates the schema
        try:
            os.link(tmp, path)  # atomic, and never over a store another process created meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def git_sha() -> str:
    """The commit under test: ATTNLAB_GIT_SHA when the submitter injected it (a Ray job's working dir is
    not a git checkout), else `git rev-parse HEAD`, else 'unknown'."""
    if os.environ.get("ATTNLAB_GIT_SHA"):
        return os.environ["ATTNLAB_GIT_SHA"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# MLflow 3's UI opens an experiment on its GenAI overview (traces) unless the experiment says it holds
# model training runs: then it opens on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)
            return exp_id
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def create_parent_run(client: MlflowClient, experiment_id: str, sweep: str, sweep_id: str,
                      tags: Mapping[str, str]) -> str:
    run = client.create_run(experiment_id, run_name=sweep_id,
                            tags={"sweep": sweep, "sweep_id": sweep_id, **tags})
    return run.info.run_id


def find_parent_run(client: MlflowClient, experiment_id: str, sweep_id: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.sweep_id = '{sweep_id}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000)


def get_or_create_child_run(client: MlflowClient, parent_run_id: str, trial_id: str,
                            config: Mapping[str, Any], seed: int, revive: bool = True, name: str | None = None,
                            tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(run id, already finished): a retried or resumed trial finds its own run again instead of a new
    one, and learns whether that run had already finished (then there is nothing left to do). An
    unfinished run found again is RUNNING once more (revive=False leaves it as it is). A new run is
    called `name` and carries `tags` beside the contract's."""
    parent = client.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.trial_id = '{trial_id}'"
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status == "FINISHED":
            return run_id, True
        if revive:
            client.update_run(run_id, status="RUNNING")
            if "interrupted" in found[0].data.tags:
                client.delete_tag(run_id, "interrupted")
        return run_id, False
    attn = config.get("attn", {})
    tags = {**(tags or {}), "mlflow.parentRunId": parent_run_id, "trial_id": trial_id,
            "method": attn.get("method", ""), "workload": config.get("workload", ""),
            "sweep": parent.data.tags.get("sweep", ""), "seed": str(seed)}
    run = client.create_run(exp_id, run_name=name or f"{tags['method']}-{trial_id}", tags=tags)
    params = {k: v for k, v in flatten(config).items() if k != "seed"}
    params["seed"] = seed
    log_params(client, run.info.run_id, params)
    return run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):  # log_batch takes at most 100 params a call
        client.log_batch(run_id, params=new[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                synchronous: bool = True) -> list:
    """Log with an explicit step. synchronous=False queues the write (MLflow's async logging) and returns
    the pending operations to wait on, so a training loop never waits for the tracking store."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    ops = [client.log_batch(run_id, metrics=batch[i:i + 1000], synchronous=synchronous)
           for i in range(0, len(batch), 1000)]
    return [op for op in ops if op is not None]


def last_logged_step(client: MlflowClient, run_id: str, key: str = "train/loss") -> int:
    """The highest step logged for `key`: a retried worker skips steps it already logged."""
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
