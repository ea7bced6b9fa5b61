"""`completion`: occluded image completion. An autoregressive pixel model (any causal attention method;
softmax against linear is the classic pair) completes test digits whose lower half is hidden; reported:
the accuracy of a fixed classifier on the completions (`val/acc`) and the completion time per image
(`perf/completion_ms`). See workloads/completion/task.py."""

from __future__ import annotations

from typing import Any

from workloads.common.report import Reporter, default_reporter
from workloads.common.sections import seed_of, task_from_sections
from workloads.common.train import TrainConfig, fit
from workloads.completion.task import CompletionData, CompletionTask
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


def build_task(config: dict[str, Any], validate_only: bool = False) -> tuple[CompletionTask, TrainConfig]:
    """Validate every section of a trial config and build the task (data loads on first use)."""
    return task_from_sections(config, CompletionTask, LMModel, CompletionData)


def train_fn_per_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    task, train = build_task(config)
    reporter = reporter or default_reporter()
    reporter.log_params({"data.sha256": task.splits[0].sha256})
    return fit(task, train, reporter, seed=seed_of(config))


QUALITY_METRIC, QUALITY_MODE = CompletionTask.quality_metric, CompletionTask.quality_mode
