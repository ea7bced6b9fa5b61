"""`speed`: time and peak memory of forward and forward+backward per attention method as the sequence
grows, on random inputs (the linear-vs-softmax curve); one report per length with step = length.
It trains nothing: train_fn_per_worker measures and reports; `train.batch_size` is the batch measured."""

from __future__ import annotations

from typing import Any

from workloads.common.report import Reporter, default_reporter
from workloads.common.sections import task_from_sections
from workloads.common.train import TrainConfig
from workloads.speed.task import SpeedData, SpeedModel, SpeedTask

DEFAULTS: dict[str, Any] = {
    "workload": "speed",
    "seed": 0,
    "attn": {"method": "softmax"},
    "model": {"dim": 256, "scope": "mixer"},
    "data": {"lengths": [256, 512, 1024, 2048, 4096, 8192], "warmup": 2, "repeats": 5},
    "train": {"batch_size": 4, "steps": 1},
}
SMOKE: dict[str, Any] = {
    "model": {"dim": 32},
    "data": {"lengths": [16, 32, 64], "warmup": 1, "repeats": 2},
    "train": {"batch_size": 2},
}


def build_task(config: dict[str, Any], validate_only: bool = False) -> tuple[SpeedTask, TrainConfig]:
    """Validate every section of a trial config; the task's build_model() is the measured module."""
    return task_from_sections(config, SpeedTask, SpeedModel, SpeedData)


def train_fn_per_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    task, _ = build_task(config)
    return task.run(reporter or default_reporter())


QUALITY_METRIC, QUALITY_MODE = SpeedTask.quality_metric, SpeedTask.quality_mode
