"""ASHA that writes its decisions into MLflow: the child run of a trial it stops gets the tags
`stopped_early=true` and `stopped_at_step`, at the moment of the decision (a stopped trial's workers can
run a few more steps before Ray tears them down, so the trial's own last step is not the decision)."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator import tracking


class TrackedASHA(ASHAScheduler):
    def __init__(self, tracking_uri: str, parent_run_id: str, **kwargs):
        super().__init__(**kwargs)
        self._tracking_uri, self._parent_run_id = tracking_uri, parent_run_id
        self._client = None

    def __getstate__(self):  # Tune pickles the scheduler with the experiment state: no client in it
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get(self._time_attr, 0) >= self._max_t:
            # ASHA keeps a rung at max_t; a "stop" there only cuts short the trial's own wrap-up (its best
            # checkpoint upload): a trial at its last step finishes by itself.
            return TrialScheduler.CONTINUE
        if action == TrialScheduler.STOP:
            self._record(trial.trial_id, result.get(self._time_attr))
        return action

    def _record(self, trial_id: str, step) -> None:
        from mlflow.tracking import MlflowClient

        self._client = self._client or MlflowClient(self._tracking_uri)
        for run in tracking.child_runs(self._client, self._parent_run_id):
            if run.data.tags.get("trial_id") == trial_id:
                tracking.set_tags(self._client, run.info.run_id, {"stopped_early": "true",
                                                                   "stopped_at_step": str(step)})
