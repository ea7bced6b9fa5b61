"""One trial: a Tune function trainable that builds and fits a Ray Train TorchTrainer (Train V2), and
the loop each Train worker runs: the workload's train_fn_per_worker with an MLflow-logging reporter."""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from typing import Any

from orchestrator import tracking
from workloads.common.report import RayTrainReporter


@dataclasses.dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares; passed to the driver with tune.with_parameters."""

    sweep: str
    sweep_id: str
    tracking_uri: str
    parent_run_id: str
    storage: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    quality_metric: str
    quality_mode: str
    max_failures: int = 2


class MlflowRayReporter(RayTrainReporter):
    """Ray Train report for Tune (evaluation points only: ASHA acts on the quality metric, and fewer
    reports mean fewer barriers) plus, from rank 0, every point to the trial's MLflow child run with
    explicit steps. A retried worker restarts from its last checkpoint and skips steps MLflow already
    holds, so no point is logged twice."""

    def __init__(self, tracking_uri: str, run_id: str):
        super().__init__()
        self.run_id = run_id
        self.client = None
        self.logged_upto = -1
        if self.rank == 0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
            self.logged_upto = tracking.last_logged_step(self.client, run_id)

    def report(self, metrics, step, checkpoint_dir=None):
        if self.client is not None and step > self.logged_upto:
            tracking.log_metrics(self.client, self.run_id, metrics, step)
            self.logged_upto = step
        if "val/loss" in metrics:
            super().report(metrics, step, checkpoint_dir)

    def log_params(self, params):
        if self.client is not None:
            tracking.log_params(self.client, self.run_id, params)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker. Rank 0 also samples system metrics (CPU, memory, GPU) into the
    trial's run while it trains."""
    config = loop_config["config"]
    reporter = MlflowRayReporter(loop_config["tracking_uri"], loop_config["run_id"])
    workload = importlib.import_module(f"workloads.{config['workload']}")
    monitor = None
    if reporter.rank == 0:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(loop_config["run_id"], sampling_interval=2, resume_logging=True,
                                       tracking_uri=loop_config["tracking_uri"])
        monitor.start()
    try:
        workload.train_fn_per_worker(config, reporter=reporter)
    finally:
        if monitor is not None:
            monitor.finish()


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune trainable: one child run, one TorchTrainer, a deterministic Train run name so a resumed
    trial restores its own checkpoints from storage."""
    import ray.train
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    tune_ctx = tune.get_context()
    trial_id = tune_ctx.get_trial_id()
    client = MlflowClient(ctx.tracking_uri)
    seed = int(config.get("seed", 0))
    run_id = tracking.get_or_create_child_run(client, ctx.parent_run_id, trial_id, config, seed)
    client.log_dict(run_id, config, "config.json")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "tracking_uri": ctx.tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0,
            resources_per_worker={"CPU": ctx.cpus_per_worker,
                                  **({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=f"{ctx.sweep_id}-{trial_id}",
            storage_path=ctx.storage,
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=ctx.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=ctx.quality_metric,
                checkpoint_score_order=ctx.quality_mode)),
    )
    # An exception here may be Tune stopping the trial (ASHA), not a failure: the sweep closes the runs
    # of trials that did not finish, from Tune's own record of how each ended.
    result = trainer.fit()
    best = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
    if best is not None:
        log_checkpoint(client, run_id, best.path)
    client.set_terminated(run_id, status="FINISHED")


def log_checkpoint(client, run_id: str, path: str) -> None:
    """A Ray checkpoint directory (local or remote storage) as the run's `best_checkpoint` artifact."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        local = ray.train.Checkpoint(path).to_directory(os.path.join(tmp, "best_checkpoint"))
        client.log_artifacts(run_id, local, artifact_path="best_checkpoint")
