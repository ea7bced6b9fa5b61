"""Comparison of a sweep's trials, read back from MLflow: a terminal table, CSV and Markdown files,
and plots (quality against throughput and memory, learning curves per method), logged on the parent
run. `python -m orchestrator.report SWEEP [--tracking-uri URI]` rebuilds it for the latest sweep."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator import locations, tracking

COLUMNS = ("trial", "method", "knobs", "quality", "best", "tokens/s", "peak MiB", "trainable", "status")


def _varying(all_params: list[dict[str, str]]) -> list[str]:
    """The config values that differ between trials: what the ablation varies (the method aside)."""
    keys = sorted({k for p in all_params for k in p} - {"attn.method", "data.sha256", "data.corpus"})
    # among the trials that have the knob: a method's constant knobs are not "varied" just because the
    # baseline lacks them
    return [k for k in keys if len({p[k] for p in all_params if k in p}) > 1]


def _knobs(params: dict[str, str], varying: list[str]) -> str:
    shown = [k for k in varying if k in params]
    return " ".join(f"{k.removeprefix('attn.')}={params[k]}" for k in shown)


def trial_rows(client: MlflowClient, parent_run_id: str) -> list[dict[str, Any]]:
    parent = client.get_run(parent_run_id)
    metric = parent.data.tags.get("quality_metric", "val/loss")
    mode = parent.data.tags.get("quality_mode", "min")
    rows = []
    runs = tracking.child_runs(client, parent_run_id)
    varying = _varying([r.data.params for r in runs])
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric)
        values = [m.value for m in history if not math.isnan(m.value)]
        best = (min(values) if mode == "min" else max(values)) if values else float("nan")
        m = run.data.metrics
        rows.append({
            "trial": run.data.tags.get("trial_id", run.info.run_name),
            "method": run.data.tags.get("method", ""),
            "knobs": _knobs(run.data.params, varying),
            "quality": metric,
            "best": best,
            "tokens/s": m.get("perf/tokens_per_s", float("nan")),
            "peak MiB": m.get("perf/peak_mem_mib", float("nan")),
            "trainable": int(m.get("params/trainable", 0)),
            "status": _status(run, max((h.step for h in history), default=0)),
            "steps": max((h.step for h in history), default=0),
            "run_id": run.info.run_id,
        })
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (math.isnan(r["best"]), sign * r["best"]))


def _status(run, last_step: int) -> str:
    tags = run.data.tags
    if tags.get("diverged") == "true":
        return f"diverged @ {tags.get('diverged_at_step', '?')}"
    if tags.get("stopped_early") == "true":
        return f"stopped (ASHA) @ {tags.get('stopped_at_step', '?')}"
    if tags.get("interrupted") == "true":
        return f"interrupted @ {last_step}"
    return run.info.status


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in COLUMNS:
        numeric = col in ("best", "tokens/s", "peak MiB", "trainable")
        table.add_column(col, justify="right" if numeric else "left")
    for r in rows:
        table.add_row(r["trial"], r["method"], r["knobs"] or "-", r["quality"], f"{r['best']:.4f}",
                      f"{r['tokens/s']:.0f}", f"{r['peak MiB']:.0f}", f"{r['trainable']:,}", r["status"])
    Console(width=180 if not sys.stdout.isatty() else None).print(table)


def write_files(rows: list[dict[str, Any]], out_dir: Path, client: MlflowClient) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = [*COLUMNS, "steps", "run_id"]
    csv_path = out_dir / "comparison.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    md_path = out_dir / "comparison.md"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if not isinstance(r[c], float) else f"{r[c]:.4g}"
                                       for c in COLUMNS) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    paths = [csv_path, md_path]
    try:
        paths += _plots(rows, out_dir, client)
    except ImportError:  # matplotlib is optional: tables are enough
        pass
    return paths


def _plots(rows, out_dir: Path, client: MlflowClient) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return []
    metric = rows[0]["quality"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in rows:
        label = f"{r['method']} {r['knobs']}".strip()
        axes[0].scatter(r["tokens/s"], r["best"], label=label)
        axes[1].scatter(r["peak MiB"], r["best"], label=label)
        history = client.get_metric_history(r["run_id"], metric)
        pts = sorted((h.step, h.value) for h in history)
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=label)
    axes[0].set(xlabel="tokens/s", ylabel=metric, title="quality vs throughput")
    axes[1].set(xlabel="peak memory (MiB)", ylabel=metric, title="quality vs memory")
    axes[2].set(xlabel="step", ylabel=metric, title="learning curves")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def report(client: MlflowClient, parent_run_id: str, log: bool = True) -> list[dict[str, Any]]:
    parent = client.get_run(parent_run_id)
    rows = trial_rows(client, parent_run_id)
    print_table(rows, f"sweep {parent.data.tags.get('sweep')} ({parent.info.run_name})")
    if log:
        with tempfile.TemporaryDirectory() as tmp:
            write_files(rows, Path(tmp), client)
            client.log_artifacts(parent_run_id, tmp, artifact_path="comparison")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report",
                                     description="Print a sweep's comparison table from MLflow (reads only).")
    parser.add_argument("sweep", help="sweep name; the latest run of it is reported")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking URI (default: the sweep's default, ./runs/mlflow.db)")
    parser.add_argument("--sweep-id", default=None, help="a specific sweep run (its MLflow run name)")
    parser.add_argument("--log", action="store_true",
                        help="also log the table and plots again as artifacts of the sweep's parent run")
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
        print(f"error: no run of sweep {args.sweep!r} found", file=sys.stderr)
        return 2
    report(client, parents[0].info.run_id, log=args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
