"""How much of a sweep's wall time goes to training, per executor: the same sweep run side by side with
`--executor train` (a Ray Train TorchTrainer per trial) and `--executor inline` (trials train in Tune's
reused, warm actors).

    python benchmarks/bench_sweep_overhead.py                          # 8 trials, CPU-sized
    python benchmarks/bench_sweep_overhead.py --steps 3000 --gpus-per-trial 0.25   # on one GPU

Each run is `python -m orchestrator.sweep softmax --seeds 0,1` (4 configs x 2 seeds = 8 trials) in a fresh
working dir with a fresh local Ray, read back from its MLflow store:
- wall: the sweep command's wall time, Ray start-up included;
- busy: the union over trials of [first training step, last training step] divided by wall, i.e. the
  fraction of the sweep during which at least one trial was inside its training loop (steps are
  synchronised with the GPU, so on a GPU machine this is time the GPU had work);
- startup: per trial, the time from the trial's start to its first training step (`perf/startup_s`);
- overhead/trial: (wall x concurrency - total training time) / trials.
Prints a table; never asserts a time."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


class GpuSampler:
    """GPU 0's utilisation (NVML: the fraction of each sample period in which a kernel ran), sampled
    every 0.1 s in a thread over the whole command; None without an NVIDIA GPU."""

    def __init__(self):
        self.samples: list[int] = []
        self.done = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:
            self.thread = None
            return
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.done.wait(0.1):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def stop(self) -> float | None:
        if self.thread is None:
            return None
        self.done.set()
        self.thread.join()
        return sum(self.samples) / max(1, len(self.samples)) / 100


def _mean(runs: list[dict], key: str) -> float | None:
    values = [m[key] for m in runs if key in m]
    return sum(values) / len(values) if values else None


def run(executor: str, args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{executor}-"))
    cmd = [sys.executable, "-m", "orchestrator.sweep", "softmax", "--seeds", "0,1", "--executor", executor,
           "--set", f"train.steps={args.steps}", f"train.eval_every={max(1, args.steps // 4)}",
           f"model.depth={args.depth}", f"data.seq_len={args.seq_len}"]
    if args.gpus_per_trial is not None:
        cmd += ["--gpus-per-trial", str(args.gpus_per_trial)]
    sampler = GpuSampler()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    wall = time.time() - t0
    nvml_busy = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{executor} sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    exp = client.get_experiment_by_name("softmax")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    intervals, train_total, startups, new_actor, reused_actor = [], 0.0, [], [], []
    for c in children:
        start = client.get_metric_history(c.info.run_id, "perf/startup_s")
        loss = client.get_metric_history(c.info.run_id, "train/loss")
        train = client.get_metric_history(c.info.run_id, "perf/train_s")
        if not (start and loss and train):
            continue
        startups.append(start[0].value)
        (new_actor if "perf/actor_start_s" in c.data.metrics else reused_actor).append(c.data.metrics)
        train_total += max(m.value for m in train)
        intervals.append((start[0].timestamp / 1000, max(m.timestamp for m in loss) / 1000))
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):  # union of the training intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    first, last = min(a for a, _ in intervals), max(b for _, b in intervals)
    # where the idle time is: before the first training step, gaps between, after the last step
    lead, tail = first - t0, (t0 + wall) - last
    gaps = (last - first) - busy
    # the lead-in, phase by phase: the sweep's own timings (parent run) and the trials' (child runs)
    perf = parent.data.metrics
    timeline = {"python, imports, validation, Ray start": perf.get("perf/process_start_to_ray_s"),
                "Ray up -> Tune starts": perf.get("perf/ray_to_trials_s"),
                "command start -> first training step": lead,
                "new trial actors: process start -> trial": _mean(new_actor, "perf/actor_start_s"),
                "then trial start -> first step": _mean(new_actor, "perf/startup_s"),
                "of which the workload's set-up": _mean(new_actor, "perf/setup_s"),
                "reused actors: trial start -> first step": _mean(reused_actor, "perf/startup_s"),
                "last training step -> last run closed": max(c.info.end_time or 0 for c in children) / 1000 - last,
                "last training step -> end of command": tail, "of which report": perf.get("perf/report_s")}
    print(f"\n{executor}: " + "; ".join(f"{k} {v:.1f} s" for k, v in timeline.items() if v is not None), flush=True)
    concurrency = int(parent.data.params.get("max_concurrent", 1))
    return {"executor": executor, "trials": len(children), "wall_s": wall, "busy": busy / wall,
            "startup_s": sum(startups) / max(1, len(startups)), "train_s": train_total,
            "overhead_s": (wall * concurrency - train_total) / max(1, len(children)), "concurrency": concurrency,
            "lead_s": lead, "gaps_s": gaps, "tail_s": tail, "nvml_busy": nvml_busy}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gpus-per-trial", type=float, default=None)
    p.add_argument("--executors", nargs="+", default=["train", "inline"])
    args = p.parse_args()
    rows = [run(e, args) for e in args.executors]
    print(f"\nsweep: softmax x 2 seeds, train.steps={args.steps}, model.depth={args.depth}, "
          f"seq_len={args.seq_len}, gpus_per_trial={args.gpus_per_trial}")
    print("| executor | trials | at once | wall s | busy | mean startup s | overhead/trial s | training s (sum) "
          "| idle before first step s | idle gaps s | idle after last step s | GPU utilisation (NVML) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['executor']} | {r['trials']} | {r['concurrency']} | {r['wall_s']:.1f} | {r['busy']:.0%} | "
              f"{r['startup_s']:.1f} | {r['overhead_s']:.1f} | {r['train_s']:.1f} | {r['lead_s']:.1f} | "
              f"{r['gaps_s']:.1f} | {r['tail_s']:.1f} | "
              + ("n/a" if r["nvml_busy"] is None else f"{r['nvml_busy']:.0%}") + " |")
    if len(rows) == 2:
        a, b = rows
        print(f"\nwall time ratio {a['executor']}/{b['executor']}: {a['wall_s'] / b['wall_s']:.2f}")


if __name__ == "__main__":
    main()
