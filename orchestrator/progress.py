"""The sweep's console: one live line per trial (its name, step / total, quality, tokens/s, time left),
drawn by rich from Tune's callbacks in the driver, instead of Tune's tables and every actor's log
lines (`-v` brings those back). A trial that fails says why in one line, with its error file."""

from __future__ import annotations

import math

from ray import tune
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrialProgress(tune.Callback):
    def __init__(self, metric: str):
        self.metric = metric
        self.console: Console | None = None
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def __getstate__(self):  # Tune saves its callbacks with the experiment: the live display stays here
        return {"metric": self.metric, "console": None, "progress": None, "tasks": {}}

    def setup(self, **info):
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("{task.fields[quality]:>18}"), TextColumn("{task.fields[speed]:>14}"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[state]}"), console=self.console)
        self.progress.start()

    def _task(self, trial) -> int:
        if trial.trial_id not in self.tasks:
            steps = trial.config.get("train", {}).get("steps") if isinstance(trial.config, dict) else None
            self.tasks[trial.trial_id] = self.progress.add_task(str(trial), total=steps, quality="", speed="",
                                                                state="")
        return self.tasks[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.progress.update(self._task(trial), state="running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        task = self._task(trial)
        step, total = result.get("step", 0), self.progress.tasks[task].total
        quality = result.get(self.metric)
        speed = result.get("perf/tokens_per_s")
        self.progress.update(task, completed=step, total=total if total and step <= total else None,
                             quality=f"{self.metric} {quality:.4g}" if _finite(quality) else "",
                             speed=f"{speed:,.0f} tok/s" if _finite(speed) else "")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.progress.update(self._task(trial), state="done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.progress.update(self._task(trial), state="failed")
        self.console.print(f"[red]{trial} failed[/red]: {_first_line(trial)} (details: {trial.error_file})")

    def on_experiment_end(self, trials, **info):
        if self.progress is not None:
            self.progress.stop()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _first_line(trial) -> str:
    try:
        with open(trial.error_file) as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "no message"
    except (OSError, TypeError):
        return "no message"
