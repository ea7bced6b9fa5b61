"""One trial, two ways to run it.

- `inline` (single-worker trials, the default): the Tune trial's own actor trains, holding the trial's
  CPU/GPU. Tune reuses the actor for the next trial (reuse_actors), so torch, CUDA and compiled kernels
  stay warm and a trial starts in about a second instead of paying Ray Train's start-up (controller,
  worker group, imports, process group) every time.
- `train`: the Tune trial is a driver that builds and fits a Ray Train `TorchTrainer` (Train V2) with a
  deterministic run name; needed for data-parallel trials (several workers).

Either way the workload's `train_fn_per_worker` runs with a reporter that logs every point to the
trial's MLflow child run from rank 0 (explicit steps, nothing twice after a retry) and reports the
evaluation points, with checkpoints, to Tune."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shutil
import tempfile
import time
from typing import Any

from orchestrator.trial_tracking import TrialTracking
from workloads.common import scratch
from workloads.common.report import RayTrainReporter, Reporter
from workloads.common.train import TrainingDiverged


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


class MlflowLogging:
    """Rank 0 sends every point to the trial's run through a TrialTracking (its own thread: the training
    loop never waits for MLflow, and a new actor does not import it before its first step)."""

    def _init_tracking(self, tracking: TrialTracking | None, started_at: float) -> None:
        self.tracking = tracking if self.rank == 0 else None
        self.started_at = started_at
        self.ready_at = time.time()  # what follows is the workload's own set-up
        self.startup_extra: dict[str, float] = {}

    def _log(self, metrics, step) -> None:
        _maybe_fail(step)
        if self.tracking is not None:
            self.tracking.log_metrics(metrics, step)
            if "val/loss" in metrics:  # goes to Tune next, where ASHA may stop the trial: in MLflow first
                self.tracking.flush()

    def log_params(self, params):
        if self.tracking is not None:
            self.tracking.log_params(params)

    def on_train_start(self):
        # Time from the trial's start to its first training step: the sweep's per-trial overhead; of it,
        # setup_s is the workload's (data, model, optimizer, device).
        if self.tracking is not None:
            now = time.time()
            self.tracking.log_metrics({"perf/startup_s": now - self.started_at, "perf/setup_s": now - self.ready_at,
                                       **self.startup_extra}, 0)
            self.tracking.start()


class TrainWorkerReporter(MlflowLogging, RayTrainReporter):
    """Inside a Ray Train worker: every point to MLflow from rank 0; the evaluation points (which ASHA
    acts on) through ray.train.report, as the workloads' own RayTrainReporter does."""

    def __init__(self, tracking: TrialTracking, started_at: float):
        RayTrainReporter.__init__(self)
        self._init_tracking(tracking, started_at)

    def report(self, metrics, step, checkpoint_dir=None):
        self._log(metrics, step)
        if "val/loss" in metrics:
            RayTrainReporter.report(self, metrics, step, checkpoint_dir)


class StopTrial(SystemExit):
    """Tune asked this trial to stop (ASHA): leave the training loop now so the actor can be reused."""


class InlineReporter(MlflowLogging, Reporter):
    """In the Tune trial's actor: tune.report with checkpoints; keeps the best checkpoint to log it."""

    def __init__(self, tracking: TrialTracking, started_at: float, metric: str, mode: str):
        from ray import tune

        self.rank, self.world_size = 0, 1
        checkpoint = tune.get_checkpoint()
        self._restored = checkpoint.to_directory() if checkpoint is not None else None
        self.metric, self.sign = metric, (1 if mode == "min" else -1)
        self.best_value, self.best_dir = float("inf"), None
        self._init_tracking(tracking, started_at)

    def report(self, metrics, step, checkpoint_dir=None):
        from ray import tune

        if _stop_requested():
            raise StopTrial(0)
        self._log(metrics, step)
        if "val/loss" not in metrics:
            return
        if checkpoint_dir and self.sign * metrics.get(self.metric, float("inf")) < self.best_value:
            self.best_value = self.sign * metrics[self.metric]
            if self.best_dir:
                shutil.rmtree(self.best_dir, ignore_errors=True)
            self.best_dir = scratch.make("best")
            shutil.copytree(checkpoint_dir, self.best_dir, dirs_exist_ok=True)
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, "step": step}, checkpoint=checkpoint)

    def resume_checkpoint_dir(self):
        return self._restored


def _maybe_fail(step: int) -> None:
    """Fault injection for testing retries: ATTNLAB_FAIL_ONCE="STEP:PATH" makes the first trial that
    reaches STEP crash there, once (PATH marks that it happened)."""
    spec = os.environ.get("ATTNLAB_FAIL_ONCE")
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if step >= int(at) and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"ATTNLAB_FAIL_ONCE: injected failure at step {step}")


def _stop_requested() -> bool:
    # Tune stops a function trainable by setting its session's stop event; the training thread only
    # notices at its next report, so check it at every logging point. (Internal API: if it moves, trials
    # still stop, only later, and the actor is then replaced instead of reused.)
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        return bool(session and session.stop_event.is_set())
    except Exception:
        return False


def _run_workload(config: dict[str, Any], reporter: Reporter) -> None:
    workload = importlib.import_module(f"workloads.{config['workload']}")
    workload.train_fn_per_worker(config, reporter=reporter)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker (executor `train`)."""
    run_id = loop_config["run_id"]
    reporter = TrainWorkerReporter(TrialTracking(loop_config["tracking_uri"], lambda client: run_id),
                                   loop_config["started_at"])
    try:
        with reporter.tracking or contextlib.nullcontext():  # rank 0 tracks
            _run_workload(loop_config["config"], reporter)
    except TrainingDiverged as e:  # every rank sees it (the check is collective): none is retried
        if reporter.tracking is not None:
            from orchestrator import tracking

            tracking.set_tags(reporter.tracking.client, run_id, {
                "diverged": "true", "diverged_at_step": str(e.step), "diverged_metric": e.metric})


def open_child_run(client, config: dict[str, Any], ctx: SweepContext, trial_id: str) -> tuple[str, bool]:
    """(run id, ended already) of the trial's child run, created with its resolved config. A trial that
    ended before a resume (finished, stopped early, diverged) keeps its run as it is."""
    from orchestrator import tracking
    from orchestrator.spec import resolved

    full = resolved(config)  # every knob, defaults included: what the trial really ran with
    done = trial_id in ctx.done_trials
    run_id, finished = tracking.get_or_create_child_run(client, ctx.parent_run_id, trial_id, full,
                                                        int(config.get("seed", 0)), revive=not done)
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


def mark_diverged(client, run_id: str, error: TrainingDiverged) -> None:
    """Tag the run (`diverged`, the step and the metric that went non-finite) and close it FAILED."""
    from orchestrator import tracking

    tracking.set_tags(client, run_id, {"diverged": "true", "diverged_at_step": str(error.step),
                                       "diverged_metric": error.metric})
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
                _run_workload(config, reporter)
        except StopTrial:
            return  # the sweep closes stopped trials' runs from Tune's record
        except TrainingDiverged as e:  # not retried: the same seed diverges again
            mark_diverged(tracker.client, tracker.run_id, e)
            tune.report({ctx.quality_metric: _worst(ctx.quality_mode), "step": e.step, "diverged": 1.0})
            return
        if reporter.best_dir and not _stop_requested():
            tracker.client.log_artifacts(tracker.run_id, reporter.best_dir, artifact_path="best_checkpoint")
        tracker.client.set_terminated(tracker.run_id, status="FINISHED")
    finally:
        if reporter.best_dir:
            shutil.rmtree(reporter.best_dir, ignore_errors=True)


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
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "tracking_uri": ctx.tracking_uri, "run_id": run_id,
                           "started_at": started_at},
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
