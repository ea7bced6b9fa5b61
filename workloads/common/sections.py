"""The common shape of a workload: attn, train, model and data sections, a task built from them and
trained by the shared loop (workloads.common.train.fit)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attention import MethodConfig
from workloads.common.report import Reporter
from workloads.common.train import TrainConfig, fit
from workloads.contract import Sections


def standard_sections(model_cls: type, data_cls: type, **more: type) -> dict[str, type]:
    """attn, train, model, data (the order they are validated in), then `more`."""
    return {"attn": MethodConfig, "train": TrainConfig, "model": model_cls, "data": data_cls, **more}


def standard_task(task_cls: type, check_attn: Callable[[MethodConfig], None] | None = None):
    """make_task for tasks built as task_cls(attn, model, data, batch_size, seed)."""
    def make_task(s: Sections, validate_only: bool):
        if check_attn is not None:
            check_attn(s.attn)
        return task_cls(s.attn, s.model, s.data, s.train.batch_size, s.seed)
    return make_task


def fit_run(params: Callable[[Any], dict[str, Any]] | None = None):
    """run for tasks trained by the shared loop; `params(task)`: what the data resolved to (its sha256)."""
    def run(task, s: Sections, reporter: Reporter) -> dict[str, float]:
        if params is not None:
            reporter.log_params(params(task))
        return fit(task, s.train, reporter, seed=s.seed)
    return run
