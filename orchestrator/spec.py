"""Named sweeps: what they search, on which workload, and their validation before any trial starts."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any

from attention.config import ConfigError, closest, rejecting_inert_knobs
from workloads import contract

PROFILES = ("smoke", "cpu", "gpu")
SCHEDULERS = ("fifo", "asha")


@dataclasses.dataclass(frozen=True)
class Profile:
    """A sweep at one size. `base` overrides the workload's defaults (model, data, training budget);
    `space` is the Tune param_space fragment searched at that size (typically {"attn":
    tune.grid_search([...])}), with knob values that act at those sizes; `seeds` each config runs with;
    `shows`: one sentence on what a run of this size can tell (printed when the sweep starts)."""

    space: Mapping[str, Any]
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    shows: str = ""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A named sweep: its workload, its profiles (`smoke`: tiny sizes that test the machinery; `cpu`: what
    a few minutes of a laptop allow; `gpu`: sizes whose baseline learns past the workload's trivial
    floor), the scheduler (FIFO: every trial gets the same budget), the comparison groups ASHA may cut
    within (config keys such as "data.variant"; the baseline is never cut), and the baseline: the part
    of a trial config that makes it the reference the others are compared with."""

    name: str
    description: str
    workload: str
    cpu: Profile
    gpu: Profile | None = None            # None: the cpu profile on GPUs too
    smoke: Profile | None = None          # None: the cpu profile's space at the workload's smoke sizes
    scheduler: str = "fifo"
    group_by: tuple[str, ...] = ()
    baseline: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"attn": {"method": "softmax"}})
    grace_fraction: float = 0.25          # ASHA's first rung, as a fraction of train.steps

    def profile(self, name: str) -> Profile:
        if name not in PROFILES:
            raise ConfigError(f"--profile: got {name!r}, allowed: {', '.join(PROFILES)}")
        chosen = {"smoke": self.smoke, "cpu": self.cpu, "gpu": self.gpu}[name]
        if chosen is None:  # smoke: the cpu space, one seed; gpu: the cpu profile
            return dataclasses.replace(self.cpu, base={}, seeds=(0,)) if name == "smoke" else self.cpu
        return chosen


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


def get_workload(name: str) -> contract.Workload:
    try:
        return contract.get(name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"workload: {name!r} is not available in this installation ({e})") from e


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def merge_space(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A workload config merged with a Tune search space: `override` wins, sections merge key by key, a
    grid ({"grid_search": [...]}) replaces what it overrides, and a plain section merged onto a grid goes
    into each of its alternatives."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if _is_grid(old) and isinstance(value, Mapping) and not _is_grid(value):
            out[key] = {"grid_search": [merge_space(alt, value) if isinstance(alt, Mapping) else value
                                        for alt in old["grid_search"]]}
        elif isinstance(value, Mapping) and isinstance(old, Mapping) and not _is_grid(value):
            out[key] = merge_space(old, value)
        else:
            out[key] = value
    return out


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


def param_space(spec: SweepSpec, profile: str = "cpu", workload: str | None = None,
                overrides: Mapping[str, Any] | None = None, seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The full Tune param_space: workload defaults < (smoke sizes) < the profile's base < its space <
    `--set` overrides; the seed a grid over the profile's seeds (or `seeds`)."""
    chosen = get_workload(workload or spec.workload)
    chosen.check_keys(overrides or {}, "--set")
    size = spec.profile(profile)
    config = merge_space(chosen.defaults, chosen.smoke) if profile == "smoke" else dict(chosen.defaults)
    config = merge_space(merge_space(config, size.base), size.space)
    seeds = tuple(seeds if seeds is not None else size.seeds)
    config["seed"] = tune_grid(list(seeds)) if len(seeds) > 1 else seeds[0]
    config = merge_space(config, overrides or {})
    config["workload"] = chosen.name
    return config


def tune_grid(values: list[Any]) -> dict[str, list[Any]]:
    """Tune's grid_search, without importing Ray here (the spec is read before Ray starts)."""
    return {"grid_search": values}


def matches(config: Mapping[str, Any], part: Mapping[str, Any]) -> bool:
    """Whether every key of `part` (nested) has the same value in `config`: a trial is the baseline."""
    return all(matches(config.get(k, {}), v) if isinstance(v, Mapping) else config.get(k) == v
               for k, v in part.items())


def group_label(config: Mapping[str, Any], group_by: tuple[str, ...]) -> str:
    """The comparison group of a trial: `data.variant=inverted`, or `all` when the sweep has one."""
    return " ".join(f"{key}={dotted(config, key)}" for key in group_by) or "all"


def dotted(config: Mapping[str, Any], key: str) -> Any:
    """config["data"]["variant"] for "data.variant" (None when absent)."""
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


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
    chosen = get_workload(space["workload"])
    count, tasks = 0, []
    seen: set[str] = set()
    for config in expand(space):
        count += 1
        key = repr(sorted(config.items(), key=lambda kv: kv[0]))
        if key in seen:
            continue
        seen.add(key)
        try:
            with rejecting_inert_knobs():  # a knob that cannot act at these sizes fails the sweep here
                tasks.append((config, chosen.build(config, validate_only=True)[0]))
        except ConfigError as e:
            raise ConfigError(f"{e} (in trial config attn={config.get('attn')})") from e
    return count, tasks


def build_models(tasks: list) -> None:
    """Build each task's model on the meta device (no memory, no data): what only a constructor checks
    (shapes that must divide, a method's own limits) fails here, before any trial."""
    from orchestrator.meta_build import build_on_meta

    for config, task in tasks:
        try:
            with rejecting_inert_knobs():
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
    """The trial config with every field of every section filled in (defaults included), as the workload
    resolves it: the params a trial logs, and compares across trials, include the knobs it did not set."""
    return get_workload(config["workload"]).build(config, validate_only=True)[1]
