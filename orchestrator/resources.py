"""How many trials can run at once without deadlock.

A Tune trial's driver only waits on its Train workers, so it reserves no CPU (it declares a little
memory instead: Ray rejects an empty resource request); the workers reserve the CPUs and GPUs. The
concurrency is capped by what the cluster can give every running trial's workers at the same time,
so no combination of drivers and workers can starve."""

from __future__ import annotations

import dataclasses
import math

from attention.config import ConfigError

DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}


@dataclasses.dataclass(frozen=True)
class TrialResources:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_concurrent: int

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


def plan(cluster: dict[str, float], workers: int, gpus_per_trial: float, cpus_per_worker: float = 1.0,
         max_concurrent: int | None = None) -> TrialResources:
    cpus = cluster.get("CPU", 0.0)
    gpus = cluster.get("GPU", 0.0)
    if workers < 1:
        raise ConfigError(f"--workers-per-trial: must be >= 1, got {workers}")
    if gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial: must be >= 0, got {gpus_per_trial}")
    if gpus_per_trial > gpus:
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial:g} asked for, the cluster has {gpus:g} GPUs")
    if workers * cpus_per_worker > cpus:
        raise ConfigError(f"--workers-per-trial: {workers} workers x {cpus_per_worker:g} CPU need more than "
                          f"the cluster's {cpus:g} CPUs")
    fits = math.floor(cpus / (workers * cpus_per_worker) + 1e-9)
    if gpus_per_trial > 0:
        fits = min(fits, math.floor(gpus / gpus_per_trial + 1e-9))
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent: must be >= 1, got {max_concurrent}")
        fits = min(fits, max_concurrent)
    return TrialResources(workers, cpus_per_worker, gpus_per_trial / workers, max(1, fits))


def parse_capacity(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in ("CPU", "GPU") or out[name] < 0:
            raise ConfigError(f"--capacity: expected CPU=N or GPU=N with N >= 0, got {item!r}")
    return out


def with_capacity(cluster: dict[str, float], items: list[str]) -> dict[str, float]:
    """The cluster's resources now, or what it is declared to grow to, whichever is larger."""
    declared = parse_capacity(items)
    return {**cluster, **{k: max(cluster.get(k, 0.0), v) for k, v in declared.items()}}
