"""The one interface between a workload and whatever runs it: the orchestrator, the workload's own command
line, a test. The orchestrator imports nothing else of `workloads`.

A workload declares (`WORKLOAD = Workload(...)` in its package):
- its name and a one-line summary;
- its config sections, in the order they are validated (the first bad field is the one reported): each a
  frozen dataclass that checks itself when built; `attn` is the attention method's own config;
- the defaults of a trial config and the overrides of `--smoke` (tiny sizes that test the machinery);
- its quality metric and whether lower or higher is better;
- `make_task(sections, validate_only)`: the task from validated sections (data loads on first use);
- `run(task, sections, reporter)`: train (or measure), reporting every point; the last metrics back;
- optionally `floors(task)`: its trivial floors on the validation split (`Floor`), the primary one first.

`build(config)` gives the task and the resolved config: every field of every section, defaults included
(what a trial logs as its params). Points a scheduler may act on are reported with `evaluation=True`.

Nothing here imports torch, Ray or MLflow: this module loads in milliseconds."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from attention.config import ConfigError, closest
from workloads.common.config import flatten, merge, section_from_dict
from workloads.common.report import ForwardingReporter, LocalReporter, Reporter
from workloads.common.scratch import make as scratch_dir
from workloads.common.scratch import remove_orphans as remove_orphaned_scratch

WORKLOADS = ("lm", "mqar", "image", "lora", "completion", "speed", "distill")
MODES = ("min", "max")

__all__ = ["WORKLOADS", "ConfigError", "Floor", "ForwardingReporter", "LocalReporter", "Reporter", "Sections",
           "TrainingDiverged", "Workload", "flatten", "get", "merge", "remove_orphaned_scratch", "scratch_dir"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. Nothing after it can be trusted (the weights are poisoned), so
    training stops at once; a sweep marks the trial diverged and goes on with the others."""

    def __init__(self, step: int, metric: str, value: float):
        super().__init__(f"training diverged at step {step}: {metric} = {value}")
        self.step, self.metric, self.value = step, metric, value


@dataclasses.dataclass(frozen=True)
class Floor:
    """A trivial floor: what a predictor that learns nothing beyond simple statistics of the data scores on
    the workload's validation split, in the units of its quality metric (bigram entropy in bpc, majority-
    class accuracy, chance recall). A model has learned something beyond it only when it ends more than
    `margin` past it: below `value - margin` for a "min" metric, above `value + margin` for "max".

    name: a metric-key-friendly label (lowercase, digits, _), e.g. "bigram"; unit: the metric's unit;
    why: one short sentence a report prints, e.g. "predicting each character from the previous one alone"."""

    name: str
    value: float
    margin: float
    unit: str
    why: str

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"Floor.name: got {self.name!r}, allowed: lowercase letters, digits and _, "
                             f"starting with a letter")
        for field in ("value", "margin"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Floor.{field} ({self.name}): got {v!r}, allowed: a finite number")
            object.__setattr__(self, field, float(v))
        if self.margin < 0:
            raise ValueError(f"Floor.margin ({self.name}): got {self.margin!r}, allowed: a number >= 0")

    def cleared(self, value: float, mode: str) -> bool:
        """Whether a final metric `value` is past the floor by more than its margin (NaN never is)."""
        if mode not in MODES:
            raise ValueError(f"mode: got {mode!r}, allowed: {', '.join(MODES)}")
        return value < self.value - self.margin if mode == "min" else value > self.value + self.margin


class Sections:
    """A trial config's validated sections (`sections.attn`, `sections.train`, ...) and its seed."""

    def __init__(self, values: Mapping[str, Any], seed: int):
        self._values, self.seed = dict(values), seed

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def resolved(self) -> dict[str, Any]:
        """Every field of every section, defaults included."""
        return {name: (value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value))
                for name, value in self._values.items()}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    sections: Mapping[str, type]
    defaults: Mapping[str, Any]
    smoke: Mapping[str, Any]
    quality_metric: str
    quality_mode: str
    make_task: Callable[[Sections, bool], Any]
    run: Callable[[Any, Sections, Reporter], dict[str, float]]
    # The trivial floors of a built task on its validation split, the primary one (the one a baseline must
    # clear) first; None: the workload has none (speed measures, it does not learn).
    floors: Callable[[Any], list[Floor]] | None = None

    def __post_init__(self):
        if self.quality_mode not in MODES:
            raise ValueError(f"{self.name}: quality_mode must be one of {MODES}, got {self.quality_mode!r}")
        if self.floors is not None and not callable(self.floors):
            raise ValueError(f"{self.name}: floors must be a function of the task or None, got {self.floors!r}")
        missing = set(self.sections) - set(self.defaults)
        if missing or "seed" not in self.defaults:
            raise ValueError(f"{self.name}: defaults need every section and a seed; missing {sorted(missing)}")

    def config(self, smoke: bool = False, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A trial config: the defaults, the smoke sizes when asked, then `overrides` (checked)."""
        config = merge(self.defaults, self.smoke) if smoke else dict(self.defaults)
        self.check_keys(overrides or {}, "config")
        return {**merge(config, overrides or {}), "workload": self.name}

    def check_keys(self, config: Mapping[str, Any], where: str) -> None:
        """Every top-level key is a section (given as a mapping) or the seed: a typo in a section name
        fails instead of being ignored."""
        allowed = [*self.sections, "seed"]
        for key, value in config.items():
            if key == "workload":
                if value != self.name:
                    raise ConfigError(f"{where} workload: this config is for workload {self.name!r}, got "
                                      f"{value!r} (a sweep chooses its workload with --workload)")
            elif key not in allowed:
                raise ConfigError(f"{where} {key}: workload {self.name!r} has no section or value {key!r}"
                                  f"{closest([key], allowed)}; allowed: {', '.join(allowed)}")
            elif key in self.sections and not isinstance(value, Mapping):
                raise ConfigError(f"{where} {key}: a section of workload {self.name!r}; set its fields, "
                                  f"e.g. {key}.FIELD=VALUE")
            elif key == "seed" and isinstance(value, Mapping) and set(value) != {"grid_search"}:
                raise ConfigError(f"{where} seed.{next(iter(value), '')}: seed is a value, not a section; "
                                  f"use seed=VALUE")

    def parse(self, config: Mapping[str, Any]) -> Sections:
        """Every section validated, in the declared order."""
        self.check_keys(config, "config")
        values = {name: _section(name, cls, config.get(name, self.defaults[name]))
                  for name, cls in self.sections.items()}
        seed = config.get("seed", self.defaults["seed"])
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: got {seed!r}, allowed: an integer >= 0")
        return Sections(values, seed)

    def build(self, config: Mapping[str, Any], validate_only: bool = False) -> tuple[Any, dict[str, Any]]:
        """(the task, the resolved config: every field of every section, defaults included)."""
        sections = self.parse(config)
        task = self.make_task(sections, validate_only)
        # a task that changes a section while it is built (distill's student takes its teacher's sizes)
        # says what it really runs with
        resolved = {**sections.resolved(), **getattr(task, "resolved_sections", {})}
        return task, {"workload": self.name, "seed": sections.seed, **resolved}

    def trivial_floors(self, config: Mapping[str, Any]) -> list[Floor]:
        """The trivial floors of a trial config's validation split, primary first ([] when the workload
        declares none). Builds the task for real: the data loads (and is prepared on first use)."""
        sections = self.parse(config)
        if self.floors is None:
            return []
        floors = list(self.floors(self.make_task(sections, False)))
        for floor in floors:
            if not isinstance(floor, Floor):
                raise TypeError(f"{self.name}: floors must return Floor objects, got {floor!r}")
        return floors

    def knob_table(self) -> str:
        """Every knob of every section with its default and type, for --help (imports torch)."""
        from workloads.common.knobs import knob_table

        return knob_table(self)

    def build_task(self, config: Mapping[str, Any], validate_only: bool = False) -> tuple[Any, Any]:
        """(the task, its train section): what tests and tools that drive the training loop build."""
        sections = self.parse(config)
        return self.make_task(sections, validate_only), sections.train

    def train(self, config: Mapping[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
        sections = self.parse(config)
        return self.run(self.make_task(sections, False), sections, reporter or LocalReporter())


def _section(name: str, cls: type, values: Any):
    if name == "attn":  # the method's own config class, from attention's registry
        from attention import config_from_dict

        return config_from_dict(values)
    return section_from_dict(cls, values, name)


def get(name: str) -> Workload:
    """The workload called `name` (its package is imported: torch loads)."""
    if name not in WORKLOADS:
        raise ConfigError(f"workload: got {name!r}{closest([name], WORKLOADS)}, allowed: {', '.join(WORKLOADS)}")
    return importlib.import_module(f"workloads.{name}").WORKLOAD
