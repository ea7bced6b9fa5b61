"""The common shape of a workload's trial config: attn, model, data and train sections and a seed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attention import MethodConfig, config_from_dict
from workloads.common.config import section_from_dict
from workloads.common.train import TrainConfig


def seed_of(config: dict[str, Any]) -> int:
    return int(config.get("seed", 0))


def task_from_sections(config: dict[str, Any], task_cls: type, model_cls: type, data_cls: type,
                       check_attn: Callable[[MethodConfig], None] | None = None):
    """Validate the attn, train, model and data sections (in that order: the first bad field is the one
    reported) and build `task_cls(attn, model, data, batch_size, seed)`. Returns (task, train)."""
    attn = config_from_dict(config.get("attn", {"method": "softmax"}))
    if check_attn is not None:
        check_attn(attn)
    train = section_from_dict(TrainConfig, config.get("train"), "train")
    task = task_cls(attn, section_from_dict(model_cls, config.get("model"), "model"),
                    section_from_dict(data_cls, config.get("data"), "data"), train.batch_size, seed_of(config))
    return task, train
