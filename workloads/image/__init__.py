"""`image`: classification accuracy of a ViT whose mixer is any attention method, on real MNIST,
Fashion-MNIST or scikit-learn's digits (workloads.common.images). attn.method="colt5" gives CoLT5's
routed ViT (routed attention and routed feed-forward in every block)."""

from __future__ import annotations

from typing import Any

from workloads.common.sections import fit_run, standard_sections, standard_task
from workloads.contract import Workload
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

WORKLOAD = Workload(
    name="image",
    summary=__doc__.split("\n\n")[0],
    sections=standard_sections(ViTConfig, ImageData),
    defaults=DEFAULTS,
    smoke=SMOKE,
    quality_metric=ImageTask.quality_metric,
    quality_mode=ImageTask.quality_mode,
    floors=ImageTask.floors,
    make_task=standard_task(ImageTask, check_attn=check_bidirectional),
    run=fit_run(lambda task: {"data.sha256": task.images.sha256}),
)

build_task = WORKLOAD.build_task
