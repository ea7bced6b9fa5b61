"""Where a training loop sends metrics and checkpoints, so one loop serves a terminal and a sweep.

A Reporter is told `report(metrics, step, checkpoint_dir, evaluation)` at every logging point by every
worker (a data-parallel runner's report may be a barrier: all ranks call it). Subclasses decide where it
goes: LocalReporter here, the orchestrator's reporters in a sweep."""

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

    def report(self, metrics: dict[str, float], step: int, checkpoint_dir: str | None = None,
               evaluation: bool = False) -> None:
        """`evaluation`: an evaluation point (it carries the quality metric; a scheduler may act on it)."""
        raise NotImplementedError

    def resume_checkpoint_dir(self) -> str | None:
        """A directory to resume from (the last checkpoint reported), or None to start fresh."""
        return None

    def on_train_start(self) -> None:
        """Called once the model, optimizer and data are ready, right before the first step."""

    def log_params(self, params: dict[str, Any]) -> None:
        """What the config resolved to beyond its sections (a corpus' sha256). Default: nothing."""

    def close(self) -> None:
        pass


class ForwardingReporter(Reporter):
    """Hands everything to `inner`; a subclass changes what it needs (and nothing is dropped)."""

    def __init__(self, inner: Reporter):
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        self.inner.report(metrics, step, checkpoint_dir, evaluation)

    def resume_checkpoint_dir(self):
        return self.inner.resume_checkpoint_dir()

    def on_train_start(self):
        self.inner.on_train_start()

    def log_params(self, params):
        self.inner.log_params(params)

    def close(self):
        self.inner.close()


class LocalReporter(Reporter):
    """Standalone runs: keeps the history, prints a line per report, keeps the last checkpoint in
    `run_dir/checkpoint` so `--resume` continues the same curve."""

    def __init__(self, run_dir: str | os.PathLike | None = None, quiet: bool = False):
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="attnlab-run-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.history: list[dict[str, float]] = []

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
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
