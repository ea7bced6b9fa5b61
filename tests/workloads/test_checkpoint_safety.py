"""A crafted checkpoint (a pickle whose loading runs a command) is refused, with a clear error naming
the option it came from, wherever the lab reads one: a run's resume checkpoint, a distillation teacher,
a LoRA base model, the sampler's checkpoint. The payload never runs."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import workloads.distill as distill
import workloads.lm as lm
import workloads.lora as lora
from workloads.common import checkpoint
from workloads.common.report import LocalReporter
from workloads.contract import merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class Payload:
    """Unpickling this runs `touch MARKER` (what an attacker's file would do with anything else)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted(tmp_path):
    """A state.pt that looks like a training checkpoint and carries the payload; the marker path."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil" / "state.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "extra": Payload(marker)}, path)
    return path, marker


def test_the_payload_really_runs_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # what a full unpickling of the crafted file does
    assert marker.exists()


def test_a_distillation_teacher_is_refused(crafted):
    path, marker = crafted
    config = merge(merge(distill.DEFAULTS, distill.SMOKE), {"distill": {"teacher_checkpoint": str(path)}})
    with pytest.raises(checkpoint.UnsafeCheckpoint, match=r"distill\.teacher_checkpoint: .*not a plain-data "
                                                          r"checkpoint.*posix\.system"):
        distill.build_task(config)
    assert not marker.exists()


def test_a_lora_base_model_is_refused(crafted):
    path, marker = crafted
    config = merge(merge(lora.DEFAULTS, lora.SMOKE), {"model": {"base_checkpoint": str(path)}})
    task, _ = lora.build_task(config)
    with pytest.raises(checkpoint.UnsafeCheckpoint, match=r"model\.base_checkpoint"):
        task.build_model()
    assert not marker.exists()


def test_a_runs_resume_checkpoint_is_refused(crafted, tmp_path):
    path, marker = crafted
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "state.pt").write_bytes(path.read_bytes())
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="resume checkpoint"):
        lm.WORKLOAD.train(merge(lm.DEFAULTS, lm.SMOKE), LocalReporter(run_dir, quiet=True))
    assert not marker.exists()


def test_the_sampler_refuses_it_without_a_traceback(crafted, tmp_path):
    path, marker = crafted
    config = tmp_path / "config.json"
    config.write_text(json.dumps(merge(lm.DEFAULTS, lm.SMOKE)))
    out = subprocess.run([sys.executable, "-m", "workloads.lm.sample", "--config", str(config), "--checkpoint",
                          str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--checkpoint" in out.stderr and "not a plain-data checkpoint" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not marker.exists()


def test_a_training_checkpoint_round_trips_as_plain_data(tmp_path):
    run_dir = tmp_path / "run"
    lm.WORKLOAD.train(merge(lm.DEFAULTS, lm.SMOKE), LocalReporter(run_dir, quiet=True))
    state = checkpoint.load(run_dir / "checkpoint" / "state.pt")
    assert state["step"] == lm.SMOKE["train"]["steps"] and set(state["rng"]) >= {"python", "numpy", "torch"}
