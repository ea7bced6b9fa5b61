"""`distill`: a softmax teacher distilled into a SEA student (or any method) on the character LM; reports the
student's val/bpc against the teacher's val/teacher_bpc, and saves the estimated mask and the sparse
attention map of one sample as PNG images with each checkpoint."""

from __future__ import annotations

from typing import Any

from workloads.common.sections import standard_sections
from workloads.common.train import fit
from workloads.contract import Reporter, Sections, Workload
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


def _make_task(s: Sections, validate_only: bool) -> DistillTask:
    """With a teacher checkpoint (and not validate_only) the student takes the teacher's sizes. The data
    loads, and a teacher without checkpoint trains, on first use."""
    state = None
    if s.distill.teacher_checkpoint and s.distill.mode != "scratch" and not validate_only:
        state = load_state(s.distill.teacher_checkpoint)
    student = build_student_task(s.attn, s.model, s.data, s.train.batch_size, s.seed, state, s.distill)
    return DistillTask(student, s.distill, s.train, s.seed, teacher_state=state)


def _run(task: DistillTask, s: Sections, reporter: Reporter) -> dict[str, float]:
    reporter.log_params({"data.sha256": task.corpus.sha256, "data.corpus": task.corpus.name})
    return fit(task, s.train, ImageReporter(reporter, task), seed=s.seed)


WORKLOAD = Workload(
    name="distill",
    summary=__doc__.split("\n\n")[0],
    sections=standard_sections(LMModel, LMData, distill=DistillConfig),
    defaults=DEFAULTS,
    smoke=SMOKE,
    quality_metric=DistillTask.quality_metric,
    quality_mode=DistillTask.quality_mode,
    floors=DistillTask.floors,
    make_task=_make_task,
    run=_run,
)

build_task = WORKLOAD.build_task
