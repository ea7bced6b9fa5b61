"""A trial's MLflow traffic on a thread of its own, started when training starts.

A new trial actor spent ~3.5 s of the H100 machine's time before its first step on MLflow alone: importing
it (2.6 s), opening the sqlite store and creating the child run. None of it is needed to train: the
thread starts with the first step, imports MLflow and opens (creates or finds) the run while the loop
waits on the GPU, then logs what was queued meanwhile and everything after; an evaluation point waits
until all is written before it goes to Tune (a scheduler may stop the trial on it). A retried trial skips the
steps its previous attempt logged; an error in the thread fails the trial at its next log call or at
close(), never silently."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

_STOP = object()


class TrialTracking:
    """open_run(client) -> run_id creates or finds the trial's run; it runs on the tracking thread."""

    def __init__(self, tracking_uri: str, open_run: Callable[[Any], str], system_metrics: bool = True):
        self.tracking_uri = tracking_uri
        self._open_run = open_run
        self._system_metrics = system_metrics
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.client = None
        self.run_id: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="attnlab-tracking", daemon=True)
            self._thread.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._raise_if_failed()
        self._queue.put(("metrics", dict(metrics), step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._raise_if_failed()
        self._queue.put(("params", dict(params), None))

    def flush(self) -> None:
        """Wait until everything queued so far is in MLflow. Called before an evaluation point goes to
        Tune: ASHA may stop the trial on it, and every point a scheduler acted on must be in the run."""
        self.start()
        done = threading.Event()
        self._queue.put(("flush", done, None))
        while not done.wait(0.05):
            if self._error is not None:
                break
        self._raise_if_failed()

    def close(self, raise_errors: bool = True) -> tuple[Any, str | None]:
        """Log everything queued, stop the system metrics, and return (client, run_id). The run is
        created even if training never started, so a trial that failed early still has its run."""
        self.start()
        self._queue.put(_STOP)
        self._thread.join()
        if raise_errors:
            self._raise_if_failed()
        return self.client, self.run_id

    def __enter__(self) -> TrialTracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # leaving with the workload's error: what was queued still lands, and that error is the one seen
        self.close(raise_errors=exc_type is None)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"tracking the trial in MLflow ({self.tracking_uri}) failed: {self._error!r}") \
                from self._error

    def _work(self) -> None:
        monitor = None
        try:
            from mlflow.tracking import MlflowClient

            from orchestrator import tracking

            client = MlflowClient(self.tracking_uri)
            run_id = self._open_run(client)
            logged_upto = tracking.last_logged_step(client, run_id)  # by a previous attempt of this trial
            self.client, self.run_id = client, run_id
            if self._system_metrics:
                monitor = _system_metrics(run_id, self.tracking_uri)
            done = False
            while not done:
                items = [self._queue.get()]
                while not self._queue.empty():  # everything queued meanwhile: one write a step
                    items.append(self._queue.get())
                by_step: dict[int, dict[str, float]] = {}
                flushed = []
                for item in items:
                    if item is _STOP:
                        done = True
                    elif item[0] == "flush":
                        flushed.append(item[1])
                    elif item[0] == "params":
                        tracking.log_params(client, run_id, item[1])
                    elif item[2] > logged_upto:
                        by_step.setdefault(item[2], {}).update(item[1])
                for step, metrics in sorted(by_step.items()):
                    tracking.log_metrics(client, run_id, metrics, step)
                for event in flushed:
                    event.set()
        except BaseException as e:  # reported to the training loop (next log call or flush) and at close()
            self._error = e
            print(f"attnlab: tracking the trial in MLflow ({self.tracking_uri}) failed: {e!r}", file=sys.stderr,
                  flush=True)
            while (item := self._queue.get()) is not _STOP:  # let flush() and close() return
                if item[0] == "flush":
                    item[1].set()
        finally:
            if monitor is not None:
                monitor.finish()


def _system_metrics(run_id: str, tracking_uri: str):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=2, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    return monitor
