"""Where a training loop sends metrics and checkpoints, so one loop serves a terminal and Ray Train.

A Reporter is told `report(metrics, step, checkpoint_dir)` at every logging point by every worker
(Ray Train's report is a barrier: all ranks call it). Subclasses decide where it goes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class Reporter:
    rank: int = 0
    world_size: int = 1

    def report(self, metrics: dict[str, float], step: int, checkpoint_dir: str | None = None) -> None:
        raise NotImplementedError

    def resume_checkpoint_dir(self) -> str | None:
        """A directory to resume from (the last checkpoint reported), or None to start fresh."""
        return None

    def on_train_start(self) -> None:
        """Called once the model, optimizer and data are ready, right before the first step."""

    def log_params(self, params: dict[str, Any]) -> None:
        """The resolved config, flattened. Default: nothing (the orchestrator logs it)."""

    def close(self) -> None:
        pass


class LocalReporter(Reporter):
    """Standalone runs: keeps the history, prints a line per report, keeps the last checkpoint in
    `run_dir/checkpoint` so `--resume` continues the same curve."""

    def __init__(self, run_dir: str | os.PathLike | None = None, quiet: bool = False):
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="attnlab-run-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.history: list[dict[str, float]] = []

    def report(self, metrics, step, checkpoint_dir=None):
        self.history.append({"step": step, **metrics})
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if checkpoint_dir:
            dest = self.run_dir / "checkpoint"
            tmp = self.run_dir / "checkpoint.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)  # atomic swap: a crash never leaves a half-written checkpoint
        if not self.quiet:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                              if k.startswith(("train/", "val/", "perf/tokens")))
            print(f"step {step}: {shown}", flush=True)

    def resume_checkpoint_dir(self):
        path = self.run_dir / "checkpoint"
        return str(path) if path.exists() else None


class RayTrainReporter(Reporter):
    """Inside a Ray Train worker: metrics and checkpoints go through `ray.train.report`."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self._ray_train = ray.train
        self._restored = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self._restored = checkpoint.to_directory()

    def report(self, metrics, step, checkpoint_dir=None):
        checkpoint = None
        if checkpoint_dir and self.rank == 0:
            checkpoint = self._ray_train.Checkpoint.from_directory(checkpoint_dir)
        self._ray_train.report({**metrics, "step": step}, checkpoint=checkpoint)

    def resume_checkpoint_dir(self):
        return self._restored


def default_reporter() -> Reporter:
    """Ray Train's when running in a Ray Train worker, else a local one."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return RayTrainReporter()
    except Exception:
        return LocalReporter()
