"""`mqar`: multi-query associative recall (Zoology), generated from a seed; accuracy on the queries
(`val/acc`) of a decoder with any causal attention method."""

from __future__ import annotations

from typing import Any

from workloads.common.report import Reporter, default_reporter
from workloads.common.sections import seed_of, task_from_sections
from workloads.common.train import TrainConfig, fit
from workloads.lm.task import LMModel
from workloads.mqar.task import MQARData, MQARTask

DEFAULTS: dict[str, Any] = {
    "workload": "mqar",
    "seed": 0,
    "attn": {"method": "softmax"},
    "model": {"dim": 64, "depth": 2},
    # Measured on an H100 (softmax, dim 64, depth 2, lr 3e-3): this setting is solved (val/acc 0.997) by
    # step 500; seq_len 128 with 16 pairs and 256 tokens still sat at 0.08 after 3000 steps. Sweeps
    # raise seq_len and num_kv_pairs (and model.dim) from here.
    "data": {"seq_len": 64, "num_kv_pairs": 8, "vocab_size": 128},
    "train": {"steps": 1500, "batch_size": 64, "lr": 3e-3, "warmup": 100, "eval_every": 250,
              "log_every": 25},
}
SMOKE: dict[str, Any] = {
    "model": {"dim": 32, "depth": 1},
    "data": {"seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32, "eval_examples": 32},
    "train": {"steps": 12, "batch_size": 8, "warmup": 2, "eval_every": 6, "log_every": 3},
}


def build_task(config: dict[str, Any], validate_only: bool = False) -> tuple[MQARTask, TrainConfig]:
    """Validate every section of a trial config and build the task (sequences are generated per step)."""
    return task_from_sections(config, MQARTask, LMModel, MQARData)


def train_fn_per_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    task, train = build_task(config)
    return fit(task, train, reporter or default_reporter(), seed=seed_of(config))


QUALITY_METRIC, QUALITY_MODE = MQARTask.quality_metric, MQARTask.quality_mode
