"""`lm`: character-level language modelling (bits per character) with any causal attention method."""

from __future__ import annotations

from typing import Any

from workloads.common.sections import fit_run, standard_sections, standard_task
from workloads.contract import Workload
from workloads.lm.task import LMData, LMModel, LMTask

DEFAULTS: dict[str, Any] = {
    "workload": "lm",
    "seed": 0,
    "attn": {"method": "softmax"},
    "model": {"dim": 128, "depth": 2},
    "data": {"source": "auto", "seq_len": 128},
    "train": {"steps": 400, "batch_size": 16, "lr": 2e-3, "eval_every": 100},
}
SMOKE: dict[str, Any] = {
    "model": {"dim": 32, "depth": 1},
    "data": {"seq_len": 32, "eval_batches": 2},
    "train": {"steps": 12, "batch_size": 4, "warmup": 2, "eval_every": 6, "log_every": 3},
}

WORKLOAD = Workload(
    name="lm",
    summary=__doc__.split("\n\n")[0],
    sections=standard_sections(LMModel, LMData),
    defaults=DEFAULTS,
    smoke=SMOKE,
    quality_metric=LMTask.quality_metric,
    quality_mode=LMTask.quality_mode,
    floors=LMTask.floors,
    make_task=standard_task(LMTask),
    run=fit_run(lambda task: {"data.sha256": task.corpus.sha256, "data.corpus": task.corpus.name}),
)

build_task = WORKLOAD.build_task
