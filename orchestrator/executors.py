"""One trial, two ways to run it.

- `inline` (single-worker trials, the default): the Tune trial's own actor trains, holding the trial's
  CPU/GPU. Tune reuses the actor for the next trial (reuse_actors), so torch, CUDA and compiled kernels
  stay warm and a trial starts in about a second instead of paying Ray Train's start-up (controller,
  worker group, imports, process group) every time.
- `train`: the Tune trial is a driver that builds and fits a Ray Train `TorchTrainer` (Train V2) with a
  deterministic run name; needed for data-parallel trials (several workers).

Either way the workload (through workloads.contract) trains with a reporter (orchestrator.reporters)
that logs every point to the trial's MLflow child run from rank 0, explicit steps and nothing twice after
a retry, and hands the evaluation points, with checkpoints, to Tune."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from typing import Any

from orchestrator.reporters import InlineReporter, TrainWorkerReporter, with_fault_injection
from orchestrator.trial_tracking import TrialTracking
from workloads import contract


@dataclasses.dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares; passed to the trainable with tune.with_parameters."""

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
    done_trials: frozenset[str] = frozenset()  # resumed sweep: finished, stopped early or diverged
    swept: tuple[str, ...] = ()                # the dotted config keys the sweep varies (orchestrator.labels)
    group_by: tuple[str, ...] = ()             # config keys of the comparison groups

    def run_tags(self, config: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """A trial's run name and tags: its config label, group, and each swept knob as `swept.KEY`
        (MLflow's compare view shows these, not the constants)."""
        from orchestrator.labels import config_label, run_name
        from orchestrator.spec import group_label
        from workloads.contract import flatten

        flat = flatten(config)
        tags = {"config": config_label(config, self.swept), "group": group_label(config, self.group_by),
                **{f"swept.{k}": str(flat[k]) for k in self.swept if k in flat}}
        return run_name(config, self.swept), tags


def open_child_run(client, config: dict[str, Any], ctx: SweepContext, trial_id: str) -> tuple[str, bool]:
    """(run id, ended already) of the trial's child run, created with its resolved config. A trial that
    ended before a resume (finished, stopped early, diverged) keeps its run as it is."""
    from orchestrator import tracking
    from orchestrator.spec import resolved

    full = resolved(config)  # every knob, defaults included: what the trial really runs with
    done = trial_id in ctx.done_trials
    name, tags = ctx.run_tags(config)
    run_id, finished = tracking.get_or_create_child_run(client, ctx.parent_run_id, trial_id, full,
                                                        full["seed"], revive=not done, name=name, tags=tags)
    finished = finished or done
    if not finished:
        client.log_dict(run_id, full, "config.json")
    return run_id, finished


def _report_finished(client, run_id: str, ctx: SweepContext) -> None:
    """The trial ended (finished, stopped early, diverged) before an interruption that Tune's saved state
    did not see: it is not run again; Tune gets its final metrics back from MLflow (Tune requires a
    result with the metric: one that never reached it counts as the worst)."""
    from ray import tune

    from orchestrator import tracking

    metrics = {ctx.quality_metric: _worst(ctx.quality_mode), **client.get_run(run_id).data.metrics}
    tune.report({**metrics, "step": max(0, tracking.last_logged_step(client, run_id))})


def _worst(mode: str) -> float:
    return float("inf") if mode == "min" else float("-inf")


def mark_diverged(client, run_id: str, error: contract.TrainingDiverged, close: bool = True) -> None:
    """Tag the run (`diverged`, the step and the metric that went non-finite) and close it FAILED."""
    from orchestrator import tracking

    tracking.set_tags(client, run_id, {"diverged": "true", "diverged_at_step": str(error.step),
                                       "diverged_metric": error.metric})
    if close:
        client.set_terminated(run_id, status="FAILED")
    print(f"attnlab: trial run {run_id}: {error}; stopped, the others go on", flush=True)


_trials_in_process = 0


def _first_trial_in_process() -> bool:
    global _trials_in_process
    _trials_in_process += 1
    return _trials_in_process == 1


def process_created() -> float:
    """When this Python process started (its imports count as start-up)."""
    import psutil

    return psutil.Process().create_time()


def run_trial_inline(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune trainable for executor `inline`: trains in this (reused) actor. The trial's run is
    opened by its tracking thread once training has started (see trial_tracking.py)."""
    from ray import tune

    started_at = time.time()
    trial_id = tune.get_context().get_trial_id()
    if trial_id in ctx.done_trials:  # a resumed sweep: this trial had ended already
        from mlflow.tracking import MlflowClient

        client = MlflowClient(ctx.tracking_uri)
        return _report_finished(client, open_child_run(client, config, ctx, trial_id)[0], ctx)
    tracker = TrialTracking(ctx.tracking_uri, lambda client: open_child_run(client, config, ctx, trial_id)[0])
    reporter = InlineReporter(tracker, started_at, ctx.quality_metric, ctx.quality_mode)
    if _first_trial_in_process():  # a new actor: how long its process took to reach the trial
        reporter.startup_extra["perf/actor_start_s"] = started_at - process_created()
    try:
        try:
            with tracker:
                contract.get(config["workload"]).train(config, with_fault_injection(reporter))
        except contract.TrainingDiverged as e:  # not retried: the same seed diverges again
            mark_diverged(tracker.client, tracker.run_id, e)
            tune.report({ctx.quality_metric: _worst(ctx.quality_mode), "step": e.step, "diverged": 1.0})
            return
        if reporter.best_dir:
            tracker.client.log_artifacts(tracker.run_id, reporter.best_dir, artifact_path="best_checkpoint")
        tracker.client.set_terminated(tracker.run_id, status="FINISHED")
    finally:  # also when Tune stops the trial (SystemExit from tune.report): the sweep closes its run
        reporter.drop_best()


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker (executor `train`)."""
    run_id, config = loop_config["run_id"], loop_config["config"]
    reporter = TrainWorkerReporter(TrialTracking(loop_config["tracking_uri"], lambda client: run_id),
                                   loop_config["started_at"])
    try:
        with reporter.tracking or contextlib.nullcontext():  # rank 0 tracks
            contract.get(config["workload"]).train(config, with_fault_injection(reporter))
    except contract.TrainingDiverged as e:  # every rank sees it (the check is collective): none is retried
        if reporter.tracking is not None:
            mark_diverged(reporter.tracking.client, run_id, e, close=False)  # the driver closes it


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune trainable for executor `train`: one TorchTrainer, a deterministic Train run name so a
    resumed trial restores its own checkpoints from storage."""
    import ray.train
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    started_at = time.time()
    client, trial_id = MlflowClient(ctx.tracking_uri), tune.get_context().get_trial_id()
    run_id, finished = open_child_run(client, config, ctx, trial_id)
    if finished:
        return _report_finished(client, run_id, ctx)
    gpu = {"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker > 0 else {}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "tracking_uri": ctx.tracking_uri, "run_id": run_id,
                           "started_at": started_at},
        scaling_config=ray.train.ScalingConfig(num_workers=ctx.workers, use_gpu=bool(gpu),
                                               resources_per_worker={"CPU": ctx.cpus_per_worker, **gpu}),
        run_config=ray.train.RunConfig(
            name=f"{ctx.sweep_id}-{trial_id}", storage_path=ctx.storage, callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=ctx.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=ctx.quality_metric,
                                                         checkpoint_score_order=ctx.quality_mode)),
    )
    # An exception here may be Tune stopping the trial, not a failure: the sweep closes the runs of
    # trials that did not finish, from the runs' tags and Tune's record of errors.
    result = trainer.fit()
    if client.get_run(run_id).data.tags.get("diverged") == "true":
        client.set_terminated(run_id, status="FAILED")
        return
    best = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
    if best is not None:
        log_checkpoint(client, run_id, best.path)
    client.set_terminated(run_id, status="FINISHED")


def log_checkpoint(client, run_id: str, path: str) -> None:
    """A checkpoint directory (local or remote storage) as the run's `best_checkpoint` artifact."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        local = ray.train.Checkpoint(path).to_directory(os.path.join(tmp, "best_checkpoint"))
        client.log_artifacts(run_id, local, artifact_path="best_checkpoint")
