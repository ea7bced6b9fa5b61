"""`lm`: character-level language modelling (bits per character) with any causal attention method."""

from __future__ import annotations

from typing import Any

from workloads.common.report import Reporter, default_reporter
from workloads.common.sections import seed_of, task_from_sections
from workloads.common.train import TrainConfig, fit
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


def build_task(config: dict[str, Any], validate_only: bool = False) -> tuple[LMTask, TrainConfig]:
    """Validate every section of a trial config and build the task (data loads on first use)."""
    return task_from_sections(config, LMTask, LMModel, LMData)


def train_fn_per_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    task, train = build_task(config)
    reporter = reporter or default_reporter()
    reporter.log_params({"data.sha256": task.corpus.sha256, "data.corpus": task.corpus.name})
    return fit(task, train, reporter, seed=seed_of(config))


QUALITY_METRIC, QUALITY_MODE = LMTask.quality_metric, LMTask.quality_mode
