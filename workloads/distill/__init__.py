"""`distill`: a softmax teacher distilled into a SEA student (or any method) on the character LM; reports the
student's val/bpc against the teacher's val/teacher_bpc, and saves the estimated mask and the sparse
attention map of one sample as PNG images with each checkpoint."""

from __future__ import annotations

from typing import Any

from attention import config_from_dict
from workloads.common.config import section_from_dict
from workloads.common.report import Reporter, default_reporter
from workloads.common.train import TrainConfig, fit
from workloads.distill.task import DistillConfig, DistillTask, ImageReporter, build_student_task, load_state
from workloads.lm.task import LMData, LMModel

DEFAULTS: dict[str, Any] = {
    "workload": "distill",
    "seed": 0,
    "attn": {"method": "sea", "k": 16, "predictor_length": 32},
    "model": {"dim": 128, "depth": 2},
    "data": {"source": "auto", "seq_len": 128},
    "train": {"steps": 400, "batch_size": 16, "lr": 1e-3, "eval_every": 100},
    "distill": {"mode": "distill", "teacher_checkpoint": "", "teacher_steps": 400},
}
SMOKE: dict[str, Any] = {
    "attn": {"k": 4, "predictor_length": 8, "loss_rows": 8},
    "model": {"dim": 32, "depth": 1},
    "data": {"seq_len": 32, "eval_batches": 2},
    "train": {"steps": 12, "batch_size": 4, "warmup": 2, "eval_every": 6, "log_every": 3},
    "distill": {"teacher_steps": 30},
}


def build_task(config: dict[str, Any], validate_only: bool = False) -> tuple[DistillTask, TrainConfig]:
    """Validate every section; with a teacher checkpoint (and not validate_only) the student takes the
    teacher's sizes. The data loads, and a teacher without checkpoint trains, on first use."""
    attn = config_from_dict(config.get("attn", DEFAULTS["attn"]))
    train = section_from_dict(TrainConfig, config.get("train"), "train")
    distill = section_from_dict(DistillConfig, config.get("distill"), "distill")
    model = section_from_dict(LMModel, config.get("model"), "model")
    data = section_from_dict(LMData, config.get("data"), "data")
    seed = int(config.get("seed", 0))
    state = None
    if distill.teacher_checkpoint and distill.mode != "scratch" and not validate_only:
        state = load_state(distill.teacher_checkpoint)
    student = build_student_task(attn, model, data, train.batch_size, seed, state, distill)
    return DistillTask(student, distill, train, seed, teacher_state=state), train


def train_fn_per_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    task, train = build_task(config)
    reporter = reporter or default_reporter()
    reporter.log_params({"data.sha256": task.corpus.sha256, "data.corpus": task.corpus.name})
    return fit(task, train, ImageReporter(reporter, task), seed=int(config.get("seed", 0)))


QUALITY_METRIC, QUALITY_MODE = DistillTask.quality_metric, DistillTask.quality_mode
