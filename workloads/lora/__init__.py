"""`lora`: the EfficientAttention experiment. A ViT (any attention method) trained on plain MNIST is
fine-tuned on quantized, rotated or inverted MNIST, fully or with LoRA adapters of rank `lora.rank`;
or adapters alone train from a random frozen base (`lora.mode=lora_scratch`). Reports `val/acc` on the
variant, trainable/total parameters, and where fine-tuning started (`start/acc_plain`,
`start/acc_variant`). See workloads/lora/task.py."""

from __future__ import annotations

from typing import Any

from workloads.common.sections import fit_run, standard_sections
from workloads.contract import Sections, Workload
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


def _make_task(s: Sections, validate_only: bool) -> LoRATask:
    check_bidirectional(s.attn)
    return LoRATask(s.attn, s.model, s.data, s.lora, s.train, s.seed, validate_only=validate_only)


WORKLOAD = Workload(
    name="lora",
    summary=__doc__.split("\n\n")[0],
    sections=standard_sections(LoRAModel, ImageData, lora=LoRASection),
    defaults=DEFAULTS,
    smoke=SMOKE,
    quality_metric=LoRATask.quality_metric,
    quality_mode=LoRATask.quality_mode,
    floors=LoRATask.floors,
    make_task=_make_task,
    run=fit_run(lambda task: {"data.sha256": task.images.sha256}),
)

build_task = WORKLOAD.build_task


__all__ = ["DEFAULTS", "MODES", "SMOKE", "WORKLOAD", "build_task"]
