"""`speed`: time and peak memory of forward and forward+backward per attention method as the sequence
grows, on random inputs (the linear-vs-softmax curve); one report per length with step = length.
It trains nothing: it measures and reports; `train.batch_size` is the batch measured."""

from __future__ import annotations

from typing import Any

from workloads.common.sections import standard_sections, standard_task
from workloads.contract import Workload
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

WORKLOAD = Workload(
    name="speed",
    summary=__doc__.split("\n\n")[0],
    sections=standard_sections(SpeedModel, SpeedData),
    defaults=DEFAULTS,
    smoke=SMOKE,
    quality_metric=SpeedTask.quality_metric,
    quality_mode=SpeedTask.quality_mode,
    make_task=standard_task(SpeedTask),
    run=lambda task, sections, reporter: task.run(reporter),
)

build_task = WORKLOAD.build_task
