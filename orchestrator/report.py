"""A sweep's comparison, read back from MLflow: per config (the seeds of a config pooled) the quality at
the common step as mean ± std and n, the final value, Δ against the baseline with its 95% interval and a
verdict, the distance to the workload's trivial floor, throughput, memory and status; then, in plain
words, what the table can and cannot say (the floors, untrained baselines, shared devices, CPU memory).

`python -m orchestrator.report SWEEP` prints it for the latest run of a sweep and writes nothing;
`--out DIR` writes comparison.{csv,md,png} and comparison_configs.csv there; `--log` logs them on the
parent run again and sets its description. The statistics are in orchestrator.compare, the figure in
orchestrator.plots."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator import compare as cmp
from orchestrator import locations, tracking

DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description
MAX_DESCRIPTION = 7900  # MLflow's tag values stop at 8000 characters


@dataclass
class Sweep:
    """The parent run's side of the comparison: what is measured, against what, on what."""
    title: str
    metric: str
    mode: str
    baseline: str | None
    device: str | None
    shared_device: bool
    floors: list[cmp.Floor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return self.floors[0].unit if self.floors else ""


def parse_floors(text: str | None) -> tuple[list[cmp.Floor], list[str]]:
    """The parent's `floors` tag (a JSON list of {name, value, margin, unit}): the floors and what was wrong."""
    if not text:
        return [], []
    try:
        items = json.loads(text)
        floors = [cmp.Floor(str(f["name"]), float(f["value"]), float(f.get("margin", 0.0)), str(f.get("unit", "")),
                            str(f.get("why", ""))) for f in items]
    except (ValueError, TypeError, KeyError) as e:
        return [], [f"the parent run's `floors` tag is not a JSON list of {{name, value, margin, unit}} ({e}): "
                    f"{text[:200]!r}; the report goes on without floors"]
    return floors, []


def read_sweep(parent) -> Sweep:
    tags = parent.data.tags
    floors, warnings = parse_floors(tags.get("floors"))
    mode = tags.get("quality_mode", "min")
    if mode not in ("min", "max"):
        warnings.append(f"quality_mode tag {mode!r} is neither 'min' nor 'max': read as 'min'")
        mode = "min"
    return Sweep(title=f"sweep {tags.get('sweep', '?')} ({parent.info.run_name})",
                 metric=tags.get("quality_metric", "val/loss"), mode=mode, baseline=tags.get("baseline") or None,
                 device=tags.get("device"), shared_device=tags.get("shared_device") == "true",
                 floors=floors, warnings=warnings)


def _step_tag(tags: dict, key: str) -> int | None:
    return int(float(tags[key])) if tags.get(key, "").replace(".", "", 1).isdigit() else None


def trial_state(status: str, tags: dict) -> tuple[str, int | None]:
    """How a trial ended (compare.FINISHED, ...) and the step its tags name for it."""
    if tags.get("diverged") == "true":
        return cmp.DIVERGED, _step_tag(tags, "diverged_at_step")
    if tags.get("interrupted") == "true" or status == "KILLED":
        return cmp.INTERRUPTED, None
    if status == "FAILED":
        return cmp.FAILED, None
    if status != "FINISHED":
        return cmp.RUNNING, None
    if tags.get("stopped_early") == "true":
        return cmp.STOPPED, _step_tag(tags, "stopped_at_step")
    return cmp.FINISHED, None


def _fallback_configs(runs) -> dict[str, str]:
    """Runs without a `config` tag (sweeps from before it): method plus the knobs that vary between trials."""
    params = [r.data.params for r in runs]
    keys = sorted({k for p in params for k in p} - {"attn.method", "data.sha256", "data.corpus", "seed"})
    varying = [k for k in keys if len({p[k] for p in params if k in p}) > 1]
    return {r.info.run_id: " ".join([r.data.tags.get("method", r.info.run_name or "?"),
                                     *(f"{k.removeprefix('attn.')}={r.data.params[k]}" for k in varying
                                       if k in r.data.params)]) for r in runs}


def read_trials(client: MlflowClient, parent_run_id: str, metric: str, device: str | None) -> list[cmp.Trial]:
    """The child runs (one search) and each one's quality history (one call per run); the latest values of
    the perf and params metrics come with the search."""
    runs = tracking.child_runs(client, parent_run_id)
    fallback = _fallback_configs(runs)
    trials = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        history = client.get_metric_history(run.info.run_id, metric)
        curve = sorted((h.step, h.value) for h in history if not math.isnan(h.value))
        state, end_step = trial_state(run.info.status, tags)
        trials.append(cmp.Trial(
            run_id=run.info.run_id, name=run.info.run_name or tags.get("trial_id", ""),
            group=tags.get("group", "all"), config=tags.get("config") or fallback[run.info.run_id],
            seed=tags.get("seed", run.data.params.get("seed", "?")), method=tags.get("method", ""),
            state=state, curve=curve, end_step=end_step, tokens_per_s=metrics.get("perf/tokens_per_s"),
            # the contract logs no peak on the CPU; a value there (older runs: the process RSS) is not one
            peak_mib=metrics.get("perf/peak_mem_mib") if device != "cpu" else None,
            trainable=metrics.get("params/trainable")))
    return trials


# ---- cells -------------------------------------------------------------------------------------------

def _digits(comparison: cmp.Comparison) -> int:
    values = [abs(r.quality.mean) for g in comparison.groups for r in g.rows if r.quality.mean is not None]
    top = max(values, default=1.0)
    return 3 if top < 10 else 2 if top < 1000 else 0


def _num(x: float | None, d: int, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+,.{d}f}".replace("-", "−") if signed else f"{x:,.{d}f}"


def _short_num(x: float, d: int) -> str:
    """At the table's precision, without trailing zeros: 3.58, 3.581."""
    return f"{round(x, d):g}"


def _floor_note(f: cmp.Floor) -> str:
    said = [w for w in (f.why, f"margin {f.margin:g}" if f.margin else "") if w]
    return f" ({'; '.join(said)})" if said else ""


def _pm(s: cmp.Stat, d: int) -> str:
    return "—" if s.mean is None else f"{_num(s.mean, d)} ± {_num(s.std, d)}"


def _final(r: cmp.ConfigRow, d: int) -> str:
    if r.final_steps is None:
        return "—"
    lo, hi = r.final_steps
    return f"{_pm(r.final, d)} @ {lo if lo == hi else f'{lo}–{hi}'}"


def _delta(r: cmp.ConfigRow, d: int) -> str:
    if r.delta is None or r.is_baseline:
        return "—"
    if r.delta.low is None:
        return _num(r.delta.value, d, True)
    return f"{_num(r.delta.value, d, True)} [{_num(r.delta.low, d, True)}, {_num(r.delta.high, d, True)}]"


def _vs_floor(r: cmp.ConfigRow, floor: cmp.Floor, d: int) -> str:
    s = r.vs_floor
    if s is None or s.mean is None:
        return "—"
    word = "cleared" if s.mean < -floor.margin else "not past" if s.mean >= 0 else "within margin"
    return f"{_num(s.mean, d, True)} {word}"


def _memory(r: cmp.ConfigRow, comparison: cmp.Comparison, sweep: Sweep) -> str:
    if not comparison.memory_measured:
        return "n/a (CPU)" if sweep.device != "cuda" else "n/a (not logged)"
    return _pm(r.peak_mib, 0)


def header(comparison: cmp.Comparison, group: cmp.GroupResult, sweep: Sweep) -> list[str]:
    step = group.common_step if group.common_step is not None else "—"
    cols = ["config", "n", f"{comparison.metric} @ {step}", "final @ step"]
    if comparison.baseline:
        cols += [f"Δ vs {comparison.baseline} [95% CI]", "verdict"]
    if comparison.primary_floor:
        cols.append(f"vs {comparison.primary_floor.name} (final)")
    cols += ["tokens/s" + (" †" if sweep.shared_device else ""), "peak MiB", "trainable", "Pareto", "status"]
    return cols


def cells(r: cmp.ConfigRow, comparison: cmp.Comparison, sweep: Sweep, d: int) -> list[str]:
    row = [r.config + (" (baseline)" if r.is_baseline else ""), str(r.quality.n), _pm(r.quality, d), _final(r, d)]
    if comparison.baseline:
        row += [_delta(r, d), r.delta.verdict if r.delta else "—"]
    if comparison.primary_floor:
        row.append(_vs_floor(r, comparison.primary_floor, d))
    pareto = ", ".join(w for w, on in (("speed", r.pareto_speed), ("memory", r.pareto_memory)) if on)
    trainable = f"{r.trainable:,.0f}" if r.trainable is not None else "—"
    return row + [_pm(r.tokens_per_s, 0), _memory(r, comparison, sweep), trainable, pareto or "—", r.status]


# ---- sentences ---------------------------------------------------------------------------------------

def _baseline_sentence(group: cmp.GroupResult, comparison: cmp.Comparison, sweep: Sweep, d: int) -> str | None:
    floor, base = comparison.primary_floor, group.baseline
    if floor is None or base is None or base.quality.mean is None:
        return None
    below, sign = ("below", "-") if comparison.mode == "min" else ("above", "+")
    at = f"{_pm(base.quality, d)} {sweep.unit}".rstrip() + f" at step {group.common_step}"
    limit = f"the {floor.name} floor {_short_num(floor.value, d)} {sign} {floor.margin:g}"
    if cmp.clears(base.quality.mean, floor, comparison.mode):
        return f"the baseline {base.config} stands at {at}, {below} {limit}: the models learned past the floor."
    return f"the baseline {base.config} stands at {at}, not {below} {limit}: this sweep compares untrained models."


def _group_sentences(group: cmp.GroupResult, comparison: cmp.Comparison, sweep: Sweep, d: int) -> list[str]:
    where = f"Group {group.name}: " if len(comparison.groups) > 1 else ""

    def say(text: str) -> str:
        return where + text if where else text[0].upper() + text[1:]

    if group.common_step is None:
        return [say("no trial finished with an evaluation: nothing to compare.")]
    out = [say(f"every trial is read at step {group.common_step}, the last evaluation step all finished trials "
               "reached" + ("; ASHA stopped some earlier, so their final values stand at lower steps"
                            if group.stopped_early else "") + ".")]
    if comparison.baseline and group.baseline is None:
        out.append(say(f"no config {comparison.baseline!r} (the baseline): no Δ."))
    elif group.baseline is not None and not group.baseline.quality.n:
        out.append(say(f"the baseline {group.baseline.config} has no finished trial: no Δ."))
    if line := _baseline_sentence(group, comparison, sweep, d):
        out.append(say(line))
    floor = comparison.primary_floor
    if floor is not None:
        stuck = [r.config for r in group.rows if not r.is_baseline and r.vs_floor and r.vs_floor.mean is not None
                 and r.vs_floor.mean >= -floor.margin]
        if stuck:
            out.append(say(f"not past the {floor.name} floor by its margin at the end: {', '.join(stuck)}."))
    return out


def sentences(comparison: cmp.Comparison, sweep: Sweep) -> list[str]:
    d = _digits(comparison)
    better = "lower" if comparison.mode == "min" else "higher"
    out = [f"{comparison.metric}: {better} is better; mean ± sample std over seeds, n = seeds in the statistics."]
    for g in comparison.groups:
        out += _group_sentences(g, comparison, sweep, d)
    if comparison.baseline:
        out.append(f"Δ = config − {comparison.baseline} at the common step, with a 95% Welch interval; "
                   "better/worse when the interval excludes 0, within noise when it contains 0, "
                   "n < 2 when a side has a single seed.")
    if comparison.floors:
        shown = ", ".join(f"{f.name} {_short_num(f.value, d)} {f.unit}".rstrip() + _floor_note(f)
                          for f in comparison.floors)
        how = "final value − floor" if comparison.mode == "min" else "floor − final value"
        out.append(f"Trivial floors on the validation split: {shown}. 'vs {comparison.floors[0].name}' = {how}: "
                   "negative = past the floor; cleared when past it by more than the margin.")
    else:
        out.append("No trivial floor was recorded for this sweep: the table cannot tell learning models from "
                   "untrained ones.")
    if any(not t.counted for g in comparison.groups for r in g.rows for t in r.trials):
        out.append("Diverged, failed, interrupted and unevaluated trials are named in the status column and "
                   "left out of n, the means, Δ and the frontier.")
    if sweep.shared_device:
        out.append("† Several trials shared a device at once: tokens/s of trials that shared a device are not "
                   "comparable with each other's absolute values (packed trials slow each other).")
    if not comparison.memory_measured:
        out.append("Peak memory is n/a: the trials ran on the CPU, where no per-trial peak allocation is measured."
                   if sweep.device != "cuda" else "Peak memory is n/a: no trial logged perf/peak_mem_mib.")
    out.append("Pareto: configs no other config beats on both quality and tokens/s (speed) or quality and "
               "peak memory (memory).")
    return out + sweep.warnings


# ---- output ------------------------------------------------------------------------------------------

def print_report(comparison: cmp.Comparison, sweep: Sweep, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220 if not sys.stdout.isatty() else None)
    d = _digits(comparison)
    for g in comparison.groups:
        title = sweep.title + (f" — group {g.name}" if len(comparison.groups) > 1 else "")
        table = Table(title=title)
        cols = header(comparison, g, sweep)
        rows = [cells(r, comparison, sweep, d) for r in g.rows]
        for i, col in enumerate(cols):
            wraps = i == 0 or col == "status"  # labels may wrap; numbers keep their line where they can
            widest = max((len(row[i]) for row in rows), default=0)
            table.add_column(col, justify="left" if wraps or col in ("verdict", "Pareto") else "right",
                             min_width=24 if i == 0 else 20 if wraps else widest)
        for r, row in zip(g.rows, rows):
            table.add_row(*row, style="bold" if r.is_baseline else None)
        console.print(table)
    for line in notes:
        console.print(line, markup=False, highlight=False)


def _md_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""])


def markdown(comparison: cmp.Comparison, sweep: Sweep, notes: list[str]) -> str:
    """The config table per group and the sentences (the parent run's description)."""
    d = _digits(comparison)
    lines = [f"## {sweep.title}", ""]
    for g in comparison.groups:
        if len(comparison.groups) > 1:
            lines += [f"### group {g.name}", ""]
        lines += _md_table(header(comparison, g, sweep), [cells(r, comparison, sweep, d) for r in g.rows])
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def markdown_trials(comparison: cmp.Comparison) -> str:
    """Every trial at its group's common step beside its final value and step (comparison.md's second part)."""
    d = _digits(comparison)
    floor = comparison.primary_floor
    cols = ["group", "config", "seed", f"{comparison.metric} @ common step", "final @ step", "how it ended"]
    cols += [f"vs {floor.name} (final)"] if floor else []
    rows = []
    for g in comparison.groups:
        for r in g.rows:
            for t in r.trials:
                at = cmp.value_at(t.curve, g.common_step) if t.counted else None
                row = [g.name, t.config, t.seed, f"{_num(at, d)} @ {g.common_step}" if at is not None else "—",
                       f"{_num(t.final, d)} @ {t.last_step}" if t.curve else "—",
                       t.state + (f" @ {t.end_step}" if t.end_step is not None else "")
                       + ("" if t.counted else " (excluded)")]
                if floor:
                    row.append(_num(cmp.floor_distance(t.final, floor, comparison.mode), d, True) if t.curve else "—")
                rows.append(row)
    return "\n".join(["### Per trial", ""] + _md_table(cols, rows))


def trial_records(comparison: cmp.Comparison) -> list[dict[str, Any]]:
    return [cmp.trial_record(t, g, comparison.floors, comparison.mode)
            for g in comparison.groups for r in g.rows for t in r.trials]


def config_records(comparison: cmp.Comparison) -> list[dict[str, Any]]:
    return [cmp.config_record(r, g) for g in comparison.groups for r in g.rows]


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for rec in records for k in rec))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def write_files(comparison: cmp.Comparison, sweep: Sweep, md: str, out_dir: Path) -> list[Path]:
    """comparison.csv (a row per trial), comparison_configs.csv (a row per config), comparison.md,
    comparison.png."""
    from orchestrator import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "comparison.csv", trial_records(comparison))
    _write_csv(out_dir / "comparison_configs.csv", config_records(comparison))
    (out_dir / "comparison.md").write_text(md + "\n" + markdown_trials(comparison))
    paths = [out_dir / n for n in ("comparison.csv", "comparison_configs.csv", "comparison.md")]
    png = plots.draw(comparison, out_dir / "comparison.png", shared_device=sweep.shared_device, device=sweep.device)
    return paths + ([png] if png else [])


def _description(md: str) -> str:
    if len(md) <= MAX_DESCRIPTION:
        return md
    return md[:MAX_DESCRIPTION].rsplit("\n", 1)[0] + "\n\n… (cut: the whole table is comparison/comparison.md)\n"


def report(client: MlflowClient, parent_run_id: str, log: bool = True,
           out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Print the comparison; write its files to out_dir; with log, log them on the parent run (artifacts
    under comparison/) and make the markdown table the run's description. Returns a dict per trial."""
    sweep = read_sweep(client.get_run(parent_run_id))
    trials = read_trials(client, parent_run_id, sweep.metric, sweep.device)
    comparison = cmp.compare(trials, sweep.metric, sweep.mode, sweep.baseline, sweep.floors)
    notes = sentences(comparison, sweep)
    print_report(comparison, sweep, notes)
    md = markdown(comparison, sweep, notes)
    if out_dir is not None:
        write_files(comparison, sweep, md, Path(out_dir))
    if log:
        with tempfile.TemporaryDirectory() as tmp:
            write_files(comparison, sweep, md, Path(tmp))
            client.log_artifacts(parent_run_id, tmp, artifact_path="comparison")
        client.set_tag(parent_run_id, DESCRIPTION_TAG, _description(md))
    return trial_records(comparison)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report",
                                     description="Print a sweep's comparison table from MLflow (reads only).")
    parser.add_argument("sweep", help="sweep name; the latest run of it is reported")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking URI (default: the sweep's default, ./runs/mlflow.db)")
    parser.add_argument("--sweep-id", default=None, help="a specific sweep run (its MLflow run name)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="also write comparison.{csv,md,png} and comparison_configs.csv to DIR")
    parser.add_argument("--log", action="store_true",
                        help="also log the table and plots again as artifacts of the sweep's parent run and set "
                             "its description to the table")
    args = parser.parse_args(argv)
    uri = locations.resolve(args.tracking_uri, "unused").tracking_uri
    db = locations.sqlite_path(uri)
    if db is not None and not db.exists():  # opening it would create an empty store here
        print(f"error: no MLflow store at {db} (give --tracking-uri)", file=sys.stderr)
        return 2
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(args.sweep)
    if exp is None:
        print(f"error: no sweep {args.sweep!r} in {uri}", file=sys.stderr)
        return 2
    filt = f"tags.sweep_id = '{args.sweep_id}'" if args.sweep_id else "tags.sweep_id != ''"
    parents = client.search_runs([exp.experiment_id], filter_string=filt, order_by=["start_time DESC"],
                                 max_results=1)
    if not parents:
        print(f"error: no run of sweep {args.sweep!r} found"
              + (f" with sweep id {args.sweep_id!r}" if args.sweep_id else ""), file=sys.stderr)
        return 2
    report(client, parents[0].info.run_id, log=args.log, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
