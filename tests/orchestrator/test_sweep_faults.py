"""An embedded sweep under faults, with real signals and real processes: Ctrl-C keeps every unfinished
trial resumable (never closed as finished), two resumes of one sweep cannot run at once, and the local
Ray it starts listens on loopback only."""

import signal

import pytest

from tests.orchestrator.conftest import (
    finish,
    is_loopback,
    listening_addresses,
    runs,
    start_sweep,
    steps_of,
    trials_training,
    wait_until,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 1200
ARGS = ["topk", "--smoke", "--set", f"train.steps={STEPS}", "train.eval_every=100", "train.log_every=50"]


def test_ctrl_c_leaves_every_unfinished_trial_resumable(workdir):
    db = workdir / "runs" / "mlflow.db"
    sweep = start_sweep(ARGS, workdir)
    wait_until(lambda: trials_training(db, "topk", 2), sweep, what="two trials training")

    # the embedded Ray, every process of it, is reachable from this machine only
    addresses = listening_addresses(sweep.pid)
    assert addresses and all(is_loopback(a) for a in addresses), addresses

    sweep.send_signal(signal.SIGINT)
    out = finish(sweep)
    assert sweep.returncode == 130, out[-3000:]
    assert "2 interrupted" in out and "--resume topk-" in out, out[-3000:]
    client, parents, children = runs(db, "topk")
    assert parents[0].info.status == "KILLED"
    assert len(children) == 2
    for child in children:  # not FINISHED: a resume must train them
        assert child.info.status == "KILLED" and child.data.tags["interrupted"] == "true"
        assert max(steps_of(client, child.info.run_id)) < STEPS

    # the same command twice at once with --resume: one continues the sweep, the other is refused
    first, second = start_sweep([*ARGS, "--resume"], workdir), start_sweep([*ARGS, "--resume"], workdir)
    outputs = {p: finish(p) for p in (first, second)}
    assert sorted(p.returncode for p in outputs) == [0, 2], [o[-2000:] for o in outputs.values()]
    refused = next(o for p, o in outputs.items() if p.returncode == 2)
    assert "is being run by pid" in refused and "Traceback" not in refused

    client, parents, children = runs(db, "topk")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and "interrupted" not in child.data.tags
        steps = steps_of(client, child.info.run_id)
        assert len(steps) == len(set(steps)), "a step was logged twice"
        if child.data.tags.get("stopped_early") != "true":  # ASHA may cut the worse one
            assert max(steps) == STEPS
