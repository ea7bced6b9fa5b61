"""Speed curves: time and peak memory of forward and forward+backward per method as the sequence grows.

Nothing is trained. For each length T of `data.lengths`, a fresh module (the token mixer alone, or
`model.depth` transformer blocks with model.scope=block) runs on random inputs (train.batch_size, T,
model.dim); the metrics of that length are reported with step = T."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from attention import MethodConfig, build
from attention.models import Transformer
from workloads.common.config import require
from workloads.common.report import Reporter
from workloads.common.train import pick_device
from workloads.speed.measure import forward_and_backward, forward_only, median_ms, peak_mib

SCOPES = ("mixer", "block")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class SpeedModel:
    """dim: model width; scope: 'mixer' (the attention alone) or 'block' (depth transformer blocks)."""

    dim: int = 256
    depth: int = 1
    scope: str = "mixer"

    def __post_init__(self):
        for name in ("dim", "depth"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"model.{name}", v,
                    "an integer >= 1")
        require(self.scope in SCOPES, "model.scope", self.scope, ", ".join(SCOPES))


@dataclasses.dataclass(frozen=True)
class SpeedData:
    """lengths: sequence lengths, ascending; warmup / repeats: untimed and timed runs per measurement
    (the median is reported); dtype: of weights and inputs ('auto': bfloat16 on CUDA, float32 on CPU)."""

    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    warmup: int = 2
    repeats: int = 5
    dtype: str = "auto"

    def __post_init__(self):
        lengths = self.lengths
        if isinstance(lengths, list):  # JSON has no tuples
            lengths = tuple(lengths)
            object.__setattr__(self, "lengths", lengths)
        require(isinstance(lengths, tuple) and len(lengths) > 0
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in lengths)
                and list(lengths) == sorted(set(lengths)), "data.lengths", self.lengths,
                "a non-empty ascending list of distinct integers >= 1")
        require(isinstance(self.warmup, int) and self.warmup >= 0, "data.warmup", self.warmup, "an integer >= 0")
        require(isinstance(self.repeats, int) and self.repeats >= 1, "data.repeats", self.repeats,
                "an integer >= 1")
        require(self.dtype in DTYPES, "data.dtype", self.dtype, ", ".join(DTYPES))

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


class SpeedTask:
    """Holds the validated sections; build_model() builds the module at the longest length (what the
    orchestrator builds on the meta device to validate a sweep)."""

    quality_metric = "perf/fwd_bwd_ms"
    quality_mode = "min"

    def __init__(self, attn: MethodConfig, model: SpeedModel, data: SpeedData, batch_size: int, seed: int):
        self.attn, self.model_cfg, self.data, self.batch_size, self.seed = attn, model, data, batch_size, seed
        for length in data.lengths:  # e.g. topk's k <= T at every length, before anything runs
            attn.check_seq_len(length)

    def build_model(self) -> nn.Module:
        m = self.model_cfg
        if m.scope == "mixer":
            return build(self.attn, m.dim)
        return Transformer(self.attn, m.dim, m.depth)

    def measure(self, length: int, device: torch.device) -> dict[str, float]:
        dtype = self.data.torch_dtype(device)
        torch.manual_seed(self.seed)
        module = self.build_model().to(device=device, dtype=dtype)
        x = torch.randn(self.batch_size, length, self.model_cfg.dim, device=device, dtype=dtype,
                        requires_grad=True)
        fwd, fwd_bwd = forward_only(module, x), forward_and_backward(module, x)
        w, r = self.data.warmup, self.data.repeats
        metrics = {"perf/fwd_ms": median_ms(fwd, device, w, r),
                   "perf/fwd_bwd_ms": median_ms(fwd_bwd, device, w, r),
                   "perf/fwd_peak_mib": peak_mib(fwd, device),
                   "perf/fwd_bwd_peak_mib": peak_mib(fwd_bwd, device)}
        metrics["perf/tokens_per_s"] = self.batch_size * length / (metrics["perf/fwd_bwd_ms"] / 1000)
        metrics["perf/seq_len"] = float(length)
        metrics["params/total"] = float(sum(p.numel() for p in module.parameters()))
        return metrics

    def run(self, reporter: Reporter, device: torch.device | None = None) -> dict[str, float]:
        """Measures every length in order, reporting each; stops at the first length that runs out of
        memory (reported as perf/oom = 1)."""
        device = device or pick_device()
        last: dict[str, Any] = {}
        reporter.on_train_start()
        for i, length in enumerate(self.data.lengths):
            try:
                if i == 0:
                    # Measured twice, the first discarded: on a fresh GPU it pays for lazy initialisation
                    # (kernel selection, workspaces) that the warm-up runs do not absorb.
                    self.measure(length, device)
                metrics = self.measure(length, device)
            except torch.OutOfMemoryError:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                reporter.report({"perf/oom": 1.0, "perf/seq_len": float(length)}, length, evaluation=False)
                break
            metrics["perf/oom"] = 0.0
            reporter.report(metrics, length, evaluation=True)  # every length is a measured point
            last = metrics
        return {k: v for k, v in last.items() if isinstance(v, float) and math.isfinite(v)}
