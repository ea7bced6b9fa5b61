"""`completion`: occluded image completion. An autoregressive pixel model (any causal attention method;
softmax against linear is the classic pair) completes test digits whose lower half is hidden; reported:
the accuracy of a fixed classifier on the completions (`val/acc`) and the completion time per image
(`perf/completion_ms`). See workloads/completion/task.py."""

from __future__ import annotations

from typing import Any

from workloads.common.sections import fit_run, standard_sections, standard_task
from workloads.completion.task import CompletionData, CompletionTask
from workloads.contract import Workload
from workloads.lm.task import LMModel

DEFAULTS: dict[str, Any] = {
    "workload": "completion",
    "seed": 0,
    "attn": {"method": "softmax"},
    "model": {"dim": 64, "depth": 2},
    "data": {"dataset": "mnist", "downsample": 2, "levels": 8, "complete_examples": 64},
    "train": {"steps": 2000, "batch_size": 32, "lr": 2e-3, "warmup": 100, "eval_every": 500,
              "log_every": 25},
}
SMOKE: dict[str, Any] = {
    "model": {"dim": 32, "depth": 1},
    "data": {"dataset": "digits", "downsample": 2, "levels": 4, "eval_examples": 32, "complete_examples": 8,
             "classifier_steps": 50},
    "train": {"steps": 12, "batch_size": 8, "warmup": 2, "eval_every": 6, "log_every": 3},
}

WORKLOAD = Workload(
    name="completion",
    summary=__doc__.split("\n\n")[0],
    sections=standard_sections(LMModel, CompletionData),
    defaults=DEFAULTS,
    smoke=SMOKE,
    quality_metric=CompletionTask.quality_metric,
    quality_mode=CompletionTask.quality_mode,
    floors=CompletionTask.floors,
    make_task=standard_task(CompletionTask),
    run=fit_run(lambda task: {"data.sha256": task.splits[0].sha256}),
)

build_task = WORKLOAD.build_task
