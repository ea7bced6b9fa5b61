"""ASHA within comparison groups: a trial is compared only with its own group's trials, and the baseline
is never stopped (its results still set the rungs). Tune's own ASHAScheduler does the halving; the
trials are fed results as Tune would feed them."""

import dataclasses

import pytest
from ray.tune.schedulers import TrialScheduler

from orchestrator import tracking
from orchestrator.scheduler import GroupedASHA


@dataclasses.dataclass
class Trial:
    """What a scheduler reads of a Tune trial: its id and config."""

    trial_id: str
    config: dict


@pytest.fixture
def parent(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.create_sqlite_store(uri)
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "t", None)
    return uri, client, tracking.create_parent_run(client, exp, "t", "t-1", {})


def _scheduler(uri, parent_id):
    return GroupedASHA(uri, parent_id, group_of=lambda c: c["variant"], is_baseline=lambda c: c["mode"] == "full",
                       metric="val/acc", mode="max", time_attr="step", max_t=100, grace_period=10,
                       reduction_factor=2, stop_last_trials=False)


def _trials(variant, values):
    return [(Trial(f"{variant}-{mode}", {"variant": variant, "mode": mode}), value) for mode, value in values]


def test_groups_are_judged_apart_and_the_baseline_always_continues(parent):
    uri, client, parent_id = parent
    scheduler = _scheduler(uri, parent_id)
    # the easy variant's trials all beat every trial of the hard one; within the hard variant the full
    # fine-tune (the baseline) is the worst of its group
    easy = _trials("quantized", [("full", 0.95), ("r1", 0.93), ("r4", 0.94), ("r16", 0.96)])
    hard = _trials("inverted", [("full", 0.10), ("r1", 0.30), ("r4", 0.35), ("r16", 0.40)])
    for trial, _ in easy + hard:
        tracking.get_or_create_child_run(client, parent_id, trial.trial_id, {}, 0)
        scheduler.on_trial_add(None, trial)
    decisions = {}
    for step in (10, 20, 40):
        for trial, value in hard + easy:  # the hard group reports first at every rung
            decisions.setdefault(trial.trial_id, []).append(
                scheduler.on_trial_result(None, trial, {"step": step, "val/acc": value}))
    stopped = {t for t, d in decisions.items() if TrialScheduler.STOP in d}
    # none of the hard variant's good trials is cut for being worse than the easy variant's
    assert {"inverted-r4", "inverted-r16"}.isdisjoint(stopped)
    # and the baselines never, though the hard one is its group's worst
    assert {"inverted-full", "quantized-full"}.isdisjoint(stopped)
    assert "inverted-r1" in stopped or "quantized-r1" in stopped  # ASHA does cut within a group
    tags = {r.data.tags["trial_id"]: r.data.tags for r in tracking.child_runs(client, parent_id)}
    assert {t for t, tag in tags.items() if tag.get("stopped_early") == "true"} == stopped
