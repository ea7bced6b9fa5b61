"""ASHA that compares a trial only with trials of its own comparison group (one MNIST variant, say) and
never stops the baseline (its results still set the rungs the others must reach), and that writes its
decisions into MLflow: the child run of a trial it stops gets the tags `stopped_early=true` and
`stopped_at_step` at the moment of the decision (a stopped trial can run a few more steps before Tune
ends it, so the trial's own last step is not the decision).

The named sweeps run FIFO by default (every trial the same budget); this is `--scheduler asha`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from orchestrator import tracking


class GroupedASHA(FIFOScheduler):
    def __init__(self, tracking_uri: str, parent_run_id: str, group_of: Callable[[dict], str],
                 is_baseline: Callable[[dict], bool], metric: str, mode: str, **asha: Any):
        super().__init__()  # Tune gives this scheduler the metric and mode itself; its ASHAs get them here
        self._group_of, self._is_baseline = group_of, is_baseline
        self._asha_kwargs = {"metric": metric, "mode": mode, **asha}
        self._groups: dict[str, ASHAScheduler] = {}
        self._max_t, self._time_attr = asha["max_t"], asha["time_attr"]
        self._tracking_uri, self._parent_run_id = tracking_uri, parent_run_id
        self._client = None

    def __getstate__(self):  # Tune pickles the scheduler with the experiment state: no client in it
        return {**self.__dict__, "_client": None}

    def _asha(self, trial) -> ASHAScheduler:
        group = self._group_of(trial.config)
        if group not in self._groups:
            self._groups[group] = ASHAScheduler(**self._asha_kwargs)
        return self._groups[group]

    def on_trial_add(self, tune_controller, trial):
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._asha(trial).on_trial_error(tune_controller, trial)

    def on_trial_complete(self, tune_controller, trial, result):
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        action = self._asha(trial).on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.STOP:
            return action
        # A stop at max_t would only cut short the trial's own wrap-up (its best checkpoint upload): a
        # trial at its last step finishes by itself. The baseline is the reference: always finished.
        if result.get(self._time_attr, 0) >= self._max_t or self._is_baseline(trial.config):
            return TrialScheduler.CONTINUE
        self._record(trial.trial_id, result.get(self._time_attr))
        return action

    def _record(self, trial_id: str, step) -> None:
        from mlflow.tracking import MlflowClient

        self._client = self._client or MlflowClient(self._tracking_uri)
        for run in tracking.child_runs(self._client, self._parent_run_id):
            if run.data.tags.get("trial_id") == trial_id:
                tracking.set_tags(self._client, run.info.run_id, {"stopped_early": "true",
                                                                   "stopped_at_step": str(step)})

    def debug_string(self) -> str:
        return f"GroupedASHA: {len(self._groups)} comparison group(s)"
