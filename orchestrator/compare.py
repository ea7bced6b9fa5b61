"""The statistics of a sweep's comparison, over per-trial records (no MLflow here: orchestrator.report reads
the runs, this module decides what they say).

Trials are grouped by (comparison group, config); the seeds of a config are its samples. Every trial is
read at its group's common step (the last evaluation step every finished, non-diverged trial of the group
reached), so configs are compared at equal budgets even when ASHA stopped some of them early. Per config:
mean ± sample std (n - 1) and n; Δ against the baseline config of the same group with a 95% Welch
interval and a verdict; the distance of the final value to the workload's primary trivial floor;
throughput and memory; and whether the config is on the Pareto frontier."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

# How a trial ended. Only COUNTED trials enter the statistics; the others are listed, marked as excluded.
FINISHED, STOPPED, DIVERGED, FAILED, INTERRUPTED, RUNNING = (
    "finished", "stopped (ASHA)", "diverged", "failed", "interrupted", "running")
COUNTED = (FINISHED, STOPPED)
BETTER, WORSE, NOISE, TOO_FEW, BASELINE = "better", "worse", "within noise", "n < 2", "baseline"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Floor:
    """A trivial floor of the workload on its validation split (e.g. bigram entropy in bpc)."""
    name: str
    value: float
    margin: float = 0.0
    unit: str = ""
    why: str = ""  # what the floor predicts from ("each character from the previous one alone")


@dataclass
class Trial:
    """One trial as the comparison needs it. curve: (step, quality) at evaluation steps, ascending, no NaN."""
    run_id: str
    name: str
    group: str
    config: str
    seed: str
    method: str
    state: str
    curve: list[tuple[int, float]]
    end_step: int | None = None  # where ASHA stopped it / where it diverged, from its tags
    tokens_per_s: float | None = None
    peak_mib: float | None = None
    trainable: float | None = None

    @property
    def counted(self) -> bool:
        return self.state in COUNTED and bool(self.curve)

    @property
    def last_step(self) -> int | None:
        return self.curve[-1][0] if self.curve else None

    @property
    def final(self) -> float | None:
        return self.curve[-1][1] if self.curve else None


@dataclass(frozen=True)
class Stat:
    """mean ± sample std over n values; std is None when n < 2 (undefined, shown as "—")."""
    n: int
    mean: float | None
    std: float | None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        xs = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
        if xs.size == 0:
            return cls(0, None, None)
        return cls(int(xs.size), float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else None)


@dataclass(frozen=True)
class Delta:
    """config - baseline at the common step, its 95% Welch interval (None when n < 2 on either side)."""
    value: float
    low: float | None
    high: float | None
    dof: float | None
    verdict: str


@dataclass
class ConfigRow:
    group: str
    config: str
    method: str
    is_baseline: bool
    trials: list[Trial]
    quality: Stat  # at the group's common step
    final: Stat
    final_steps: tuple[int, int] | None  # (lowest, highest) last evaluation step of the counted trials
    delta: Delta | None
    vs_floor: Stat | None  # distance of the final values to the primary floor
    tokens_per_s: Stat
    peak_mib: Stat
    trainable: float | None
    status: str
    pareto_speed: bool = False
    pareto_memory: bool = False


@dataclass
class GroupResult:
    name: str
    common_step: int | None
    rows: list[ConfigRow]
    baseline: ConfigRow | None

    @property
    def stopped_early(self) -> bool:
        return any(t.state == STOPPED for r in self.rows for t in r.trials)


@dataclass
class Comparison:
    metric: str
    mode: str
    floors: list[Floor]
    baseline: str | None
    groups: list[GroupResult] = field(default_factory=list)

    @property
    def primary_floor(self) -> Floor | None:
        return self.floors[0] if self.floors else None

    @property
    def memory_measured(self) -> bool:
        return any(t.peak_mib is not None for g in self.groups for r in g.rows for t in r.trials)


def common_step(trials: Sequence[Trial]) -> int | None:
    """The last evaluation step every counted trial reached: the lowest of their last steps."""
    last = [t.last_step for t in trials if t.counted]
    return min(last) if last else None


def value_at(curve: Sequence[tuple[int, float]], step: int | None) -> float | None:
    """The trial's last evaluation at or before `step` (None when it has none by then)."""
    if step is None:
        return None
    i = bisect.bisect_right([s for s, _ in curve], step)
    return curve[i - 1][1] if i else None


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile. scipy.stats.t when scipy is installed (a dev extra, not a runtime dependency);
    otherwise the 97.5% quantile from the table below, interpolated linearly in 1/dof on log t (within
    0.5% of scipy for dof >= 1)."""
    try:
        from scipy.stats import t
    except ImportError:
        if abs(p - 0.975) > 1e-12:
            raise ValueError(f"without scipy only the 97.5% t quantile is tabulated, not p={p}") from None
        return _t975_from_table(dof)
    return float(t.ppf(p, dof))


# dof -> t(0.975, dof), from scipy.stats.t.ppf; dof = inf is the normal quantile
_T975 = ((1, 12.7062), (1.25, 8.02795), (1.5, 6.01666), (1.75, 4.94885), (2, 4.30265), (2.5, 3.57465),
         (3, 3.18245), (3.5, 2.94009), (4, 2.77645), (5, 2.57058), (6, 2.44691), (7, 2.36462), (8, 2.30600),
         (9, 2.26216), (10, 2.22814), (12, 2.17881), (15, 2.13145), (20, 2.08596), (30, 2.04227),
         (60, 2.00030), (120, 1.97993), (math.inf, 1.95996))


def _t975_from_table(dof: float) -> float:
    dof = max(dof, 1.0)
    inv = [1 / d for d, _ in _T975]  # descending
    logs = [math.log(v) for _, v in _T975]
    return math.exp(float(np.interp(1 / dof, inv[::-1], logs[::-1])))


def welch_interval(a: Stat, b: Stat, confidence: float = CONFIDENCE) -> tuple[float, float, float | None]:
    """Interval of mean(a) - mean(b) with Welch's t and the Welch–Satterthwaite dof: (low, high, dof).
    Both n >= 2. Zero spread on both sides leaves a zero-width interval (dof undefined: None)."""
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    diff = a.mean - b.mean
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, None
    dof = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    half = t_quantile(0.5 + confidence / 2, dof) * se
    return diff - half, diff + half, dof


def delta(config: Stat, baseline: Stat, mode: str) -> Delta | None:
    """Δ = config - baseline, its interval, and the verdict: better/worse when the interval excludes 0
    (the sign read by `mode`), within noise when it contains 0, n < 2 when a side has one seed."""
    if config.n == 0 or baseline.n == 0:
        return None
    value = config.mean - baseline.mean
    if config.n < 2 or baseline.n < 2:
        return Delta(value, None, None, None, TOO_FEW)
    low, high, dof = welch_interval(config, baseline)
    if low <= 0 <= high:
        verdict = NOISE
    else:
        verdict = BETTER if (value < 0) == (mode == "min") else WORSE
    return Delta(value, low, high, dof, verdict)


def floor_distance(value: float, floor: Floor, mode: str) -> float:
    """value - floor for "min" (floor - value for "max"): negative = the floor was beaten by that much."""
    return value - floor.value if mode == "min" else floor.value - value


def clears(value: float, floor: Floor, mode: str) -> bool:
    """Beaten by more than the floor's margin."""
    return floor_distance(value, floor, mode) < -floor.margin


def pareto_front(points: dict[str, tuple[float, float]], mode: str, cost_higher_better: bool) -> set[str]:
    """The labels not dominated in (quality, x): x is tokens/s (higher better) or memory (lower better).
    A point dominates another when it is at least as good on both and strictly better on one."""
    def key(p):  # both axes turned into "higher is better"
        q, x = p
        return (-q if mode == "min" else q, x if cost_higher_better else -x)

    keyed = {label: key(p) for label, p in points.items()}
    front = set()
    for label, (q, x) in keyed.items():
        dominated = any(q2 >= q and x2 >= x and (q2 > q or x2 > x)
                        for other, (q2, x2) in keyed.items() if other != label)
        if not dominated:
            front.add(label)
    return front


def status_summary(trials: Sequence[Trial]) -> str:
    """'2 finished, 1 stopped (ASHA) @ 200, s2 diverged @ 300 (excluded)': counted trials by how they
    ended; the others by seed, marked as left out of the statistics."""
    parts = []
    for state in COUNTED:
        these = [t for t in trials if t.state == state and t.counted]
        if these:
            steps = sorted({t.end_step if t.end_step is not None else t.last_step for t in these})
            at = f" @ {', '.join(map(str, steps))}" if state == STOPPED else ""
            parts.append(f"{len(these)} {state}{at}")
    for t in trials:
        if not t.counted:
            how = t.state if t.curve or t.state not in COUNTED else f"{t.state}, no evaluation"
            at = f" @ {t.end_step}" if t.end_step is not None else ""
            parts.append(f"s{t.seed} {how}{at} (excluded)")
    return ", ".join(parts)


def _config_row(group: str, config: str, trials: list[Trial], step: int | None, is_baseline: bool,
                floor: Floor | None, mode: str) -> ConfigRow:
    counted = [t for t in trials if t.counted]
    finals = [t.final for t in counted]
    last = [t.last_step for t in counted]
    return ConfigRow(
        group=group, config=config, method=trials[0].method, is_baseline=is_baseline, trials=trials,
        quality=Stat.of(value_at(t.curve, step) for t in counted),
        final=Stat.of(finals), final_steps=(min(last), max(last)) if last else None, delta=None,
        vs_floor=Stat.of(floor_distance(v, floor, mode) for v in finals) if floor else None,
        tokens_per_s=Stat.of(t.tokens_per_s for t in counted), peak_mib=Stat.of(t.peak_mib for t in counted),
        trainable=next((t.trainable for t in trials if t.trainable is not None), None),
        status=status_summary(trials))


def _baseline_of(rows: list[ConfigRow], baseline: str | None) -> ConfigRow | None:
    """The row whose config is the baseline label; failing that, the only config of that method."""
    if not baseline:
        return None
    exact = [r for r in rows if r.config == baseline]
    by_method = [r for r in rows if r.method == baseline]
    found = exact or (by_method if len(by_method) == 1 else [])
    return found[0] if found else None


def _mark_pareto(rows: list[ConfigRow], mode: str) -> None:
    measured = [r for r in rows if r.quality.n and r.tokens_per_s.n]
    speed = pareto_front({r.config: (r.quality.mean, r.tokens_per_s.mean) for r in measured}, mode, True)
    with_mem = [r for r in measured if r.peak_mib.n]
    memory = pareto_front({r.config: (r.quality.mean, r.peak_mib.mean) for r in with_mem}, mode, False)
    for r in rows:
        r.pareto_speed, r.pareto_memory = r.config in speed, r.config in memory


def _group_result(name: str, trials: list[Trial], mode: str, baseline: str | None,
                  floor: Floor | None) -> GroupResult:
    step = common_step(trials)
    by_config: dict[str, list[Trial]] = {}
    for t in sorted(trials, key=lambda t: (t.config, t.seed)):
        by_config.setdefault(t.config, []).append(t)
    rows = [_config_row(name, c, ts, step, False, floor, mode) for c, ts in by_config.items()]
    base = _baseline_of(rows, baseline)
    if base is not None:
        base.is_baseline = True
        for r in rows:
            r.delta = Delta(0.0, None, None, None, BASELINE) if r is base else delta(r.quality, base.quality, mode)
    _mark_pareto(rows, mode)
    sign = 1 if mode == "min" else -1
    # the baseline first, then best first; configs without a value at the common step last
    rows.sort(key=lambda r: (not r.is_baseline, r.quality.mean is None, sign * (r.quality.mean or 0.0)))
    return GroupResult(name, step, rows, base)


def compare(trials: Sequence[Trial], metric: str, mode: str, baseline: str | None = None,
            floors: Sequence[Floor] = ()) -> Comparison:
    if mode not in ("min", "max"):
        raise ValueError(f"quality mode must be 'min' or 'max', not {mode!r}")
    result = Comparison(metric, mode, list(floors), baseline)
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(t.group, []).append(t)
    for name in sorted(groups):
        result.groups.append(_group_result(name, groups[name], mode, baseline, result.primary_floor))
    return result


def trial_record(t: Trial, group: GroupResult, floors: Sequence[Floor], mode: str) -> dict:
    """One trial's numbers, flat (a CSV row): quality at its group's common step, final value and step,
    distance of the final value to each floor."""
    record = {"group": t.group, "config": t.config, "seed": t.seed, "run": t.name, "method": t.method,
              "state": t.state, "in_stats": t.counted, "common_step": group.common_step,
              "quality_at_common": value_at(t.curve, group.common_step) if t.counted else None,
              "final": t.final, "final_step": t.last_step, "end_step": t.end_step,
              "tokens_per_s": t.tokens_per_s, "peak_mib": t.peak_mib, "trainable": t.trainable}
    for f in floors:
        record[f"vs_{f.name}"] = floor_distance(t.final, f, mode) if t.final is not None else None
    record["run_id"] = t.run_id
    return record


def config_record(r: ConfigRow, group: GroupResult) -> dict:
    """One config's numbers, flat (a CSV row)."""
    d, f = r.delta, r.final_steps
    return {"group": group.name, "config": r.config, "baseline": r.is_baseline, "n": r.quality.n,
            "common_step": group.common_step, "mean": r.quality.mean, "std": r.quality.std,
            "final_mean": r.final.mean, "final_std": r.final.std, "final_step_min": f[0] if f else None,
            "final_step_max": f[1] if f else None, "delta": d.value if d else None, "ci_low": d.low if d else None,
            "ci_high": d.high if d else None, "welch_dof": d.dof if d else None, "verdict": d.verdict if d else None,
            "vs_floor": r.vs_floor.mean if r.vs_floor else None, "tokens_per_s": r.tokens_per_s.mean,
            "tokens_per_s_std": r.tokens_per_s.std, "peak_mib": r.peak_mib.mean, "peak_mib_std": r.peak_mib.std,
            "trainable": r.trainable, "pareto_speed": r.pareto_speed, "pareto_memory": r.pareto_memory,
            "status": r.status}
