"""The `distill` workload: a SEA student distilled from a trained softmax teacher beats the same student
trained without a teacher (same seed, same steps); it starts from the teacher's weights, reports the
teacher's bpc, saves the mask / attention images with its checkpoint, trains its own teacher when given
none, and finds the best softmax trial's checkpoint of a sweep through MLflow."""

import math

import pytest
import torch

import workloads.distill as distill
import workloads.lm as lm
from attention.config import ConfigError
from orchestrator.spec import param_space, validate
from workloads.common.checkpoint import load
from workloads.common.report import LocalReporter
from workloads.contract import merge

TEACHER_STEPS = 120


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A softmax character LM trained by the lm workload (smoke sizes): run_dir/checkpoint/state.pt."""
    run = tmp_path_factory.mktemp("teacher")
    config = merge(merge(lm.DEFAULTS, lm.SMOKE),
                   {"train": {"steps": TEACHER_STEPS, "lr": 3e-3, "eval_every": TEACHER_STEPS, "log_every": 40}})
    result = lm.WORKLOAD.train(config, LocalReporter(run, quiet=True))
    return run / "checkpoint", result


def _config(mode, checkpoint="", steps=30, **distill_knobs):
    return merge(merge(distill.DEFAULTS, distill.SMOKE), {
        "train": {"steps": steps, "lr": 3e-3, "eval_every": steps, "log_every": 10},
        "distill": {"mode": mode, "teacher_checkpoint": str(checkpoint), **distill_knobs}})


def test_distilled_student_beats_the_non_distilled_one(teacher_dir, tmp_path):
    checkpoint, teacher = teacher_dir
    runs = {}
    for mode in ("distill", "scratch"):
        reporter = LocalReporter(tmp_path / mode, quiet=True)
        runs[mode] = (distill.WORKLOAD.train(_config(mode, checkpoint), reporter), reporter)
    distilled, scratch = runs["distill"][0], runs["scratch"][0]
    assert distilled["val/loss"] < scratch["val/loss"] - 0.2, (distilled, scratch)
    assert distilled["val/teacher_bpc"] == pytest.approx(teacher["val/bpc"], rel=1e-5)
    assert "val/teacher_bpc" not in scratch
    # The SEA losses against the teacher were on (logged from the mixers' aux) and the images were saved.
    history = runs["distill"][1].history
    assert any("aux/est_kl" in h and math.isfinite(h["aux/est_kl"]) for h in history)
    assert any(0 < h.get("aux/mask_density", 0) <= 1 for h in history)
    for name in ("sea_estimated_mask.png", "sea_sparse_attention.png", "state.pt"):
        assert (tmp_path / "distill" / "checkpoint" / name).stat().st_size > 1000, name


def test_student_starts_from_the_teacher_weights(teacher_dir):
    checkpoint, _ = teacher_dir
    task, _ = distill.build_task(_config("distill", checkpoint))
    student = task.build_model()
    teacher = load(checkpoint / "state.pt")["model"]
    own = student.state_dict()
    for name in ("body.blocks.0.mixer.qkv.to_q.weight", "body.blocks.0.mixer.qkv.to_kv.weight",
                 "body.blocks.0.mixer.to_out.weight", "tok.weight", "head.weight"):
        assert torch.equal(own[name], teacher[name]), name
    assert any("predictor" in n for n in own)  # SEA's own parts exist beside them
    fresh, _ = distill.build_task(_config("scratch", checkpoint))
    assert not torch.equal(fresh.build_model().state_dict()["tok.weight"], teacher["tok.weight"])


def test_a_teacher_is_trained_in_the_trial_when_none_is_given(tmp_path):
    result = distill.WORKLOAD.train(_config("distill", steps=4, teacher_steps=8),
                                         reporter=LocalReporter(tmp_path, quiet=True))
    assert math.isfinite(result["val/teacher_bpc"]) and math.isfinite(result["val/bpc"])


def test_bad_distill_settings_name_the_field(teacher_dir, tmp_path):
    checkpoint, _ = teacher_dir
    with pytest.raises(ConfigError, match=r"distill\.mode: got 'teach'"):
        distill.build_task(_config("teach"))
    with pytest.raises(ConfigError, match=r"distill\.teacher_checkpoint: .* is not a state\.pt"):
        distill.build_task(_config("distill", tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"data\.seq_len: got 64, the teacher was built for at most 32"):
        distill.build_task(merge(_config("distill", checkpoint), {"data": {"seq_len": 64}}))
    with pytest.raises(ConfigError, match=r"distill\.out_weight"):
        distill.build_task(_config("distill", out_weight=-1))
    # Validation without data or checkpoints (what a sweep does before Ray starts).
    assert validate(param_space_for_distill()) == 1


def param_space_for_distill():
    from orchestrator.spec import Profile, SweepSpec

    return param_space(SweepSpec("t", "", "distill", cpu=Profile(space={})), "smoke")


def test_best_softmax_trial_of_a_sweep_is_found_in_mlflow(teacher_dir, tmp_path):
    """Runs laid out as orchestrator.tracking/driver log them: the lowest val/bpc softmax child wins."""
    from mlflow.tracking import MlflowClient

    from orchestrator.teacher import distill_overrides, find_best_teacher

    checkpoint, _ = teacher_dir
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("attnlab", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"sweep": "softmax", "sweep_id": "softmax-1"}).info.run_id
    children = {}
    for name, method, bpc in (("good", "softmax", [5.0, 3.1, 3.3]), ("worse", "softmax", [4.0, 3.5]),
                              ("other", "sea", [2.0])):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "sweep": "softmax", "method": method}).info
        for step, value in enumerate(bpc):
            client.log_metric(run.run_id, "val/bpc", value, step=step)
        client.log_artifact(run.run_id, str(checkpoint / "state.pt"), artifact_path="best_checkpoint")
        client.log_dict(run.run_id, {"attn": {"method": method, "heads": 4}, "data": {"seq_len": 32}}, "config.json")
        children[name] = run.run_id
    ref = find_best_teacher(uri, "softmax", dest=str(tmp_path / "dl"))
    assert ref.run_id == children["good"] and ref.value == pytest.approx(3.1)
    assert load(ref.checkpoint)["model"].keys() == \
        load(checkpoint / "state.pt")["model"].keys()
    overrides = distill_overrides(ref)
    assert overrides["distill"]["teacher_heads"] == 4 and overrides["data"] == {"seq_len": 32}
    task, _ = distill.build_task(merge(_config("distill"), overrides))  # loads the downloaded teacher
    assert task.student.model_cfg.dim == 32
    with pytest.raises(LookupError, match="no 'softmax' trial of sweep 'colt5'"):
        find_best_teacher(uri, "colt5")
