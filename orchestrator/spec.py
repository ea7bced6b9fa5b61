"""Named sweeps: what they search, on which workload, and their validation before any trial starts."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any

from attention.config import ConfigError, closest
from workloads import WORKLOADS
from workloads.common.cli import merge


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep: `space` is a Tune param_space fragment over the trial config (typically
    {"attn": tune.grid_search([...])}); `base` and `smoke` override the workload's defaults."""

    name: str
    description: str
    workload: str
    space: Mapping[str, Any]
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    smoke_space: Mapping[str, Any] | None = None   # a smaller space for --smoke (default: `space`)
    smoke: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grace_fraction: float = 0.25                    # ASHA's first rung, as a fraction of train.steps


def grid(method: str, **knobs: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the knobs' values for one method, as attn config dicts."""
    names = sorted(knobs)
    return [{"method": method, **dict(zip(names, values))}
            for values in itertools.product(*(knobs[n] for n in names))]


def sweep_names() -> list[str]:
    import orchestrator.sweeps as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def check_sweep_name(name: str) -> None:
    names = sweep_names()
    if name not in names:
        raise ConfigError(f"sweep: unknown sweep {name!r}{closest([name], names)}; allowed: {', '.join(names)}")


def load_sweep(name: str) -> SweepSpec:
    check_sweep_name(name)
    return importlib.import_module(f"orchestrator.sweeps.{name}").SWEEP


def workload_module(name: str):
    if name not in WORKLOADS:
        raise ConfigError(f"workload: got {name!r}{closest([name], WORKLOADS)}, allowed: {', '.join(WORKLOADS)}")
    try:
        return importlib.import_module(f"workloads.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"workload: {name!r} is not available in this installation ({e})") from e


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set` items (`train.steps=100`, `seed=1`; values in JSON, else strings) as a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"--set: expected KEY=VALUE or SECTION.KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set: {item!r} sets a field inside {part!r}, which is given a value too")
            node = child
        node[leaf] = parsed
    return out


def check_overrides(overrides: Mapping[str, Any], defaults: Mapping[str, Any], workload: str) -> None:
    """Every top-level key of `--set` is one of the workload's sections (set field by field) or values
    (`seed`): a typo in a section name would otherwise be ignored."""
    sections = [k for k, v in defaults.items() if isinstance(v, Mapping)]
    values = [k for k, v in defaults.items() if not isinstance(v, Mapping) and k != "workload"]
    for key, value in overrides.items():
        is_grid = isinstance(value, Mapping) and set(value) == {"grid_search"}
        if key in sections and not isinstance(value, Mapping):
            raise ConfigError(f"--set {key}: a section of workload {workload!r}; set its fields, "
                              f"e.g. {key}.FIELD=VALUE")
        if key in values and isinstance(value, Mapping) and not is_grid:
            raise ConfigError(f"--set {key}.{next(iter(value), '')}: {key} is a value, not a section; "
                              f"use --set {key}=VALUE")
        if key == "workload":
            raise ConfigError("--set workload: choose the workload with --workload")
        if key not in sections and key not in values:
            raise ConfigError(f"--set {key}: workload {workload!r} has no section or value {key!r}"
                              f"{closest([key], sections + values)}; allowed: {', '.join(sections + values)}")


def param_space(spec: SweepSpec, smoke: bool, workload: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full Tune param_space: workload defaults < sweep base < --smoke < space < overrides."""
    name = workload or spec.workload
    module = workload_module(name)
    check_overrides(overrides or {}, module.DEFAULTS, name)
    config = merge(module.DEFAULTS, spec.base)
    if smoke:
        config = merge(merge(config, module.SMOKE), spec.smoke)
    space = spec.smoke_space if smoke and spec.smoke_space is not None else spec.space
    config = merge(merge(config, space), overrides or {})
    config["workload"] = name
    return config


def _alternatives(value: Any) -> list[Any] | None:
    """The values a Tune search entry can take (all grid values and categories; a few samples of a
    continuous domain), or None for a fixed value."""
    if isinstance(value, Mapping) and set(value) == {"grid_search"}:
        return list(value["grid_search"])
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, Domain):
        return [value.sample() for _ in range(4)]
    return None


def expand(space: Any) -> Iterator[Any]:
    """Every concrete config the space can produce (for validation; grid x categories)."""
    alts = _alternatives(space)
    if alts is not None:
        for alt in alts:
            yield from expand(alt)
    elif isinstance(space, Mapping):
        keys = list(space)
        for values in itertools.product(*(list(expand(space[k])) for k in keys)):
            yield dict(zip(keys, values))
    else:
        yield space


def check_configs(space: Mapping[str, Any]) -> tuple[int, list]:
    """Every config the sweep can produce, checked (sections, method, knobs): cheap, no model built.
    Returns the number of grid points and one validate-only task per distinct config."""
    module = workload_module(space["workload"])
    count, tasks = 0, []
    seen: set[str] = set()
    for config in expand(space):
        count += 1
        key = repr(sorted(config.items(), key=lambda kv: kv[0]))
        if key in seen:
            continue
        seen.add(key)
        try:
            tasks.append((config, module.build_task(config, validate_only=True)[0]))
        except ConfigError as e:
            raise ConfigError(f"{e} (in trial config attn={config.get('attn')})") from e
    return count, tasks


def build_models(tasks: list) -> None:
    """Build each task's model on the meta device (no memory, no data): what only a constructor checks
    (shapes that must divide, a method's own limits) fails here, before any trial."""
    from orchestrator.meta_build import build_on_meta

    for config, task in tasks:
        try:
            build_on_meta(task.build_model)
        except ConfigError as e:
            raise ConfigError(f"{e} (in trial config attn={config.get('attn')})") from e


def validate(space: Mapping[str, Any]) -> int:
    """check_configs then build_models: a bad knob fails before Ray starts. Returns the grid points."""
    count, tasks = check_configs(space)
    build_models(tasks)
    return count


def grid_to_choice(space: Any) -> Any:
    """Searchers that sample (Optuna) cannot take grid_search: the same values as a categorical choice."""
    from ray import tune

    if isinstance(space, Mapping) and set(space) == {"grid_search"}:
        return tune.choice([grid_to_choice(v) for v in space["grid_search"]])
    if isinstance(space, Mapping):
        return {k: grid_to_choice(v) for k, v in space.items()}
    return space


def resolved(config: Mapping[str, Any]) -> dict[str, Any]:
    """The trial config with every attention and training field filled in from the defaults, so the
    params logged for a trial (and compared across trials) include the knobs it did not set."""
    import dataclasses

    from attention import config_from_dict
    from workloads.common.config import section_from_dict
    from workloads.common.train import TrainConfig

    out = dict(config)
    if "attn" in out:
        out["attn"] = config_from_dict(out["attn"]).to_dict()
    out["train"] = dataclasses.asdict(section_from_dict(TrainConfig, out.get("train"), "train"))
    return out
