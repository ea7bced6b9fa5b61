"""The one training loop every workload uses.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
periodic evaluation, deterministic seeding and resumable checkpoints: batches are a pure function of
(seed, step, rank), and model, optimizer, scheduler, RNG state and step are saved, so a resumed run
continues the same curve. DistributedDataParallel when torch.distributed is initialised (Ray Train
does this when a trial has several workers)."""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from attention.config import ConfigError
from workloads.common import checkpoint, scratch
from workloads.common.config import require
from workloads.common.report import Reporter
from workloads.contract import TrainingDiverged

PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 100
    log_every: int = 10
    precision: str = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "log_every"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"train.{name}", v,
                    "an integer >= 1")
        require(isinstance(self.warmup, int) and self.warmup >= 0, "train.warmup", self.warmup,
                "an integer >= 0")
        require(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "train.lr", self.lr,
                "a number in (0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a number >= 0 (0 = no clipping)")
        require(self.precision in PRECISIONS, "train.precision", self.precision, ", ".join(PRECISIONS))


class Task(Protocol):
    """What a workload gives the loop."""

    quality_metric: str   # e.g. "val/bpc"
    quality_mode: str     # "min" or "max"

    def build_model(self) -> nn.Module: ...

    def batch(self, step: int, rank: int, device: torch.device) -> Any:
        """Training batch number `step` for worker `rank`: a pure function of (seed, step, rank)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch and the number of items (tokens, images) it holds."""

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation metrics on a fixed held-out set: at least `val/loss` and the quality metric."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision: bf16 asked for, but this GPU has no bf16")
        return torch.bfloat16
    return None


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The trial's own peak allocation on a GPU (reset when training starts). None on the CPU: the only
    figure there is the process's peak resident set, which grows with every trial a reused process ran
    (and counts the data, the interpreter, ...): not a property of the method."""
    if device.type == "cuda":
        return {"perf/peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {}


class Throughput:
    """Tokens/s as the median over the logging windows in steady state: the first window (and any that
    started in the first 5% of the steps) pays for warm-up (allocation, kernel selection, compilation)."""

    def __init__(self, total_steps: int):
        self.skip_until = max(1, total_steps // 20)
        self.steady: list[tuple[float, float]] = []  # (tokens/s, ms a step) of each steady window

    def add(self, first_step: int, steps: int, items: int, seconds: float) -> dict[str, float]:
        rate, step_ms = items / seconds, 1000 * seconds / steps
        if first_step >= self.skip_until:
            self.steady.append((rate, step_ms))
        shown = self.steady or [(rate, step_ms)]  # until a steady window comes, the warm-up one stands in
        return {"perf/tokens_per_s": statistics.median(r for r, _ in shown),
                "perf/step_ms": statistics.median(m for _, m in shown), "perf/window_tokens_per_s": rate}


def count_params(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fit(task: Task, cfg: TrainConfig, reporter: Reporter, seed: int = 0,
        device: torch.device | None = None, progress: bool | None = None) -> dict[str, float]:
    """Train `task` for cfg.steps; returns the last evaluation's metrics."""
    device = device or pick_device()
    seed_everything(seed)
    model = task.build_model().to(device)
    trainable, total = count_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start_step = 0
    resume_dir = reporter.resume_checkpoint_dir()
    if resume_dir:
        state = checkpoint.load(Path(resume_dir) / "state.pt", "resume checkpoint", map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start_step = state["step"]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and reporter.world_size > 1:
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    amp = autocast_dtype(cfg.precision, device)
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show and reporter.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    last_eval: dict[str, float] = {}
    train_seconds = 0.0  # time inside training steps (GPU synchronised): what a sweep's GPU is busy for
    reporter.on_train_start()
    window_loss, window_items, window_time, window_steps = 0.0, 0, 0.0, 0
    throughput = Throughput(cfg.steps)
    for step in range(start_step, cfg.steps):
        model.train()
        t0 = time.perf_counter()
        loss_sum, items = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = task.batch(step * cfg.grad_accum + micro, reporter.rank, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, n = task.loss(model, batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            items += n
        if not _finite_everywhere(loss_sum, device, reporter):
            raise TrainingDiverged(step + 1, "train/loss", loss_sum)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        window_time += time.perf_counter() - t0
        train_seconds += time.perf_counter() - t0
        window_loss += loss_sum
        window_items += items * reporter.world_size
        window_steps += 1
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        if done % cfg.log_every != 0 and not is_eval:
            continue
        metrics = {"train/loss": window_loss / window_steps,
                   **throughput.add(done - window_steps, window_steps, window_items, window_time),
                   **memory_metrics(device)}
        metrics.update({"train/lr": scheduler.get_last_lr()[0],
                        "params/trainable": float(trainable), "params/total": float(total),
                        "perf/workers": float(reporter.world_size), "perf/train_s": train_seconds})
        metrics.update(_aux_metrics(_unwrap(model)))
        window_loss, window_items, window_time, window_steps = 0.0, 0, 0.0, 0
        checkpoint_dir = None
        if is_eval:
            _unwrap(model).eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                last_eval = task.evaluate(_unwrap(model), device)
            metrics.update(last_eval)
            if not math.isfinite(last_eval.get("val/loss", 0.0)):
                raise TrainingDiverged(done, "val/loss", last_eval["val/loss"])
            if reporter.rank == 0:
                checkpoint_dir = _save_checkpoint(model, optimizer, scheduler, done)
        try:
            reporter.report(metrics, done, checkpoint_dir, evaluation=is_eval)
        finally:  # the reporter copied or uploaded it synchronously, or is stopping the trial
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if bar is not None:
        bar.close()
    return last_eval


def _finite_everywhere(loss: float, device: torch.device, reporter: Reporter) -> bool:
    """Whether the step's loss is finite on every worker. Data-parallel workers must agree: one that left
    alone would leave the others waiting in the next gradient all-reduce."""
    finite = math.isfinite(loss)
    if reporter.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        finite = flag.item() == 0.0
    return finite


def _aux_metrics(model: nn.Module) -> dict[str, float]:
    """Mixers' `aux` scalars (router convergence, mask density...), averaged over layers."""
    sums: dict[str, list[float]] = {}
    for module in model.modules():
        aux = getattr(module, "aux", None)
        if isinstance(aux, dict):
            for key, value in aux.items():
                sums.setdefault(f"aux/{key}", []).append(float(torch.as_tensor(value).float().mean()))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _save_checkpoint(model, optimizer, scheduler, step: int) -> str:
    """A fresh scratch directory holding everything needed to continue exactly from `step`."""
    directory = scratch.make(f"ckpt{step:07d}")
    torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(), "step": step},
               Path(directory) / "state.pt")
    return directory
