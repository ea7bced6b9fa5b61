"""Where a trial's workload reports to inside a sweep.

Every point goes to the trial's MLflow run from rank 0, through a TrialTracking (its own thread: the
training loop never waits for MLflow, and a new actor does not import it before its first step).
Evaluation points (the workload flags them) also go to Tune, with their checkpoints: a scheduler acts
on them, so they are in MLflow first.

Stopping: Tune stops a trial by making its next `tune.report` leave the training loop (SystemExit);
a stopped trial therefore runs on to its next evaluation point."""

from __future__ import annotations

import os
import shutil
import time

from orchestrator.trial_tracking import TrialTracking
from workloads.contract import ForwardingReporter, Reporter, scratch_dir


class MlflowReporter(Reporter):
    """What both executors' reporters share: the points to MLflow (rank 0), the start-up timings."""

    def __init__(self, tracking: TrialTracking | None, started_at: float, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.tracking = tracking if rank == 0 else None
        self.started_at = started_at
        self.ready_at = time.time()  # what follows is the workload's own set-up
        self.startup_extra: dict[str, float] = {}

    def _log(self, metrics, step, evaluation) -> None:
        if self.tracking is not None:
            self.tracking.log_metrics(metrics, step)
            if evaluation:  # goes to Tune next, where a scheduler may stop the trial: in MLflow first
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


class TrainWorkerReporter(MlflowReporter):
    """Inside a Ray Train worker: evaluation points through ray.train.report (every rank calls it: it is
    a barrier), with rank 0's checkpoint."""

    def __init__(self, tracking: TrialTracking, started_at: float):
        import ray.train

        ctx = ray.train.get_context()
        super().__init__(tracking, started_at, ctx.get_world_rank(), ctx.get_world_size())
        checkpoint = ray.train.get_checkpoint()
        self._restored = checkpoint.to_directory() if checkpoint is not None else None

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        import ray.train

        self._log(metrics, step, evaluation)
        if evaluation:
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and self.rank == 0 \
                else None
            ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)

    def resume_checkpoint_dir(self):
        return self._restored


class InlineReporter(MlflowReporter):
    """In the Tune trial's own actor: evaluation points through tune.report with their checkpoints; a
    copy of the best one is kept in a scratch folder, for the run's `best_checkpoint` artifact."""

    def __init__(self, tracking: TrialTracking, started_at: float, metric: str, mode: str):
        from ray import tune

        super().__init__(tracking, started_at)
        checkpoint = tune.get_checkpoint()
        self._restored = checkpoint.to_directory() if checkpoint is not None else None
        self.metric, self.sign = metric, (1 if mode == "min" else -1)
        self.best_value, self.best_dir = float("inf"), None

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        from ray import tune

        self._log(metrics, step, evaluation)
        if not evaluation:
            return
        if checkpoint_dir and self.sign * metrics.get(self.metric, float("inf")) < self.best_value:
            self.best_value = self.sign * metrics[self.metric]
            self.drop_best()
            self.best_dir = scratch_dir("best")
            shutil.copytree(checkpoint_dir, self.best_dir, dirs_exist_ok=True)
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, "step": step}, checkpoint=checkpoint)

    def resume_checkpoint_dir(self):
        return self._restored

    def drop_best(self) -> None:
        if self.best_dir:
            shutil.rmtree(self.best_dir, ignore_errors=True)
            self.best_dir = None


class FailOnce(ForwardingReporter):
    """Fault injection, to see retries work on a real cluster: with ATTNLAB_FAIL_ONCE="STEP:PATH" the
    first trial that reports STEP crashes there, once (PATH, on storage every worker sees, marks that it
    happened). Wraps the executor's reporter only when the variable is set."""

    def __init__(self, inner: MlflowReporter, spec: str):
        super().__init__(inner)
        at, _, self.marker = spec.partition(":")
        self.at = int(at)

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        if step >= self.at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"ATTNLAB_FAIL_ONCE: injected failure at step {step}")
        self.inner.report(metrics, step, checkpoint_dir, evaluation)


def with_fault_injection(reporter: MlflowReporter) -> Reporter:
    spec = os.environ.get("ATTNLAB_FAIL_ONCE")
    return FailOnce(reporter, spec) if spec else reporter
