"""`image`: classification accuracy of a ViT whose mixer is any attention method, on real MNIST,
Fashion-MNIST or scikit-learn's digits (workloads.common.images). attn.method="colt5" gives CoLT5's
routed ViT (routed attention and routed feed-forward in every block)."""

from __future__ import annotations

from typing import Any

from workloads.common.report import Reporter, default_reporter
from workloads.common.sections import seed_of, task_from_sections
from workloads.common.train import TrainConfig, fit
from workloads.image.model import ViTConfig
from workloads.image.task import ImageData, ImageTask, check_bidirectional

DEFAULTS: dict[str, Any] = {
    "workload": "image",
    "seed": 0,
    "attn": {"method": "softmax"},
    "model": {"dim": 64, "depth": 2, "patch_size": 4},
    "data": {"dataset": "mnist", "variant": "plain", "eval_examples": 2000},
    "train": {"steps": 600, "batch_size": 64, "lr": 2e-3, "warmup": 50, "eval_every": 200, "log_every": 20},
}
SMOKE: dict[str, Any] = {
    "model": {"dim": 32, "depth": 1, "patch_size": 4},
    "data": {"dataset": "digits", "eval_examples": 64},
    "train": {"steps": 12, "batch_size": 16, "warmup": 2, "eval_every": 6, "log_every": 3},
}


def build_task(config: dict[str, Any], validate_only: bool = False) -> tuple[ImageTask, TrainConfig]:
    """Validate every section of a trial config and build the task (data loads on first use)."""
    return task_from_sections(config, ImageTask, ViTConfig, ImageData, check_attn=check_bidirectional)


def train_fn_per_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    task, train = build_task(config)
    reporter = reporter or default_reporter()
    reporter.log_params({"data.sha256": task.images.sha256})
    return fit(task, train, reporter, seed=seed_of(config))


QUALITY_METRIC, QUALITY_MODE = ImageTask.quality_metric, ImageTask.quality_mode
