"""`lora`: the EfficientAttention experiment. A ViT (any attention method) trained on plain MNIST is
fine-tuned on quantized, rotated or inverted MNIST, fully or with LoRA adapters of rank `lora.rank`;
or adapters alone train from a random frozen base (`lora.mode=lora_scratch`). Reports `val/acc` on the
variant, trainable/total parameters, and where fine-tuning started (`start/acc_plain`,
`start/acc_variant`). See workloads/lora/task.py."""

from __future__ import annotations

from typing import Any

from attention import config_from_dict
from workloads.common.config import section_from_dict
from workloads.common.report import Reporter, default_reporter
from workloads.common.train import TrainConfig, fit
from workloads.image.task import ImageData, check_bidirectional
from workloads.lora.task import MODES, LoRAModel, LoRASection, LoRATask

DEFAULTS: dict[str, Any] = {
    "workload": "lora",
    "seed": 0,
    "attn": {"method": "softmax"},
    "model": {"dim": 64, "depth": 2, "patch_size": 7, "base_steps": 500, "base_lr": 2e-3},
    "data": {"dataset": "mnist", "variant": "rotated", "eval_examples": 2000},
    "lora": {"mode": "lora", "rank": 8, "alpha": 16.0},
    "train": {"steps": 300, "batch_size": 64, "lr": 2e-3, "warmup": 30, "eval_every": 100, "log_every": 20},
}
SMOKE: dict[str, Any] = {
    "model": {"dim": 32, "depth": 1, "patch_size": 4, "base_steps": 10},
    "data": {"dataset": "digits", "eval_examples": 64},
    "lora": {"rank": 2},
    "train": {"steps": 8, "batch_size": 16, "warmup": 2, "eval_every": 4, "log_every": 2},
}


def build_task(config: dict[str, Any], validate_only: bool = False) -> tuple[LoRATask, TrainConfig]:
    """Validate every section of a trial config and build the task (data and base load on first use)."""
    attn = config_from_dict(config.get("attn", {"method": "softmax"}))
    check_bidirectional(attn)
    train = section_from_dict(TrainConfig, config.get("train"), "train")
    task = LoRATask(attn, section_from_dict(LoRAModel, config.get("model"), "model"),
                    section_from_dict(ImageData, config.get("data"), "data"),
                    section_from_dict(LoRASection, config.get("lora"), "lora"), train,
                    int(config.get("seed", 0)), validate_only=validate_only)
    return task, train


def train_fn_per_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    task, train = build_task(config)
    reporter = reporter or default_reporter()
    reporter.log_params({"data.sha256": task.images.sha256})
    return fit(task, train, reporter, seed=int(config.get("seed", 0)))


QUALITY_METRIC, QUALITY_MODE = LoRATask.quality_metric, LoRATask.quality_mode
__all__ = ["DEFAULTS", "MODES", "QUALITY_METRIC", "QUALITY_MODE", "SMOKE", "build_task", "train_fn_per_worker"]
