"""Each GPU benchmark's --smoke path runs on the CPU (tiny sizes, the Triton kernels interpreted where
they are timed), so the scripts keep working between GPU sessions. Checks that they run and print their
table, never a time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, extra, table_header, out, written", [
    ("bench_local.py", [], "| setup |", "result.json", "result.json"),
    ("bench_colt5.py", [], "| module | dtype | CUDA graph |", "result.json", "result.json"),
    ("bench_sea.py", ["--lengths", "256"], "| T |", "results", "results/bench_sea.json"),  # --out: a folder
    ("bench_linear.py", [], "| shape |", "result.json", "result.json"),  # + its HoMM and block tables
    ("bench_topk.py", [], "| kind | dtype | T |", "result.json", "result.json"),
])
def test_smoke_path_runs_on_the_cpu(script, extra, table_header, out, written, tmp_path):
    out, written = tmp_path / out, tmp_path / written
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(out), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert table_header in proc.stdout, proc.stdout[-2000:]
    assert written.exists() and written.stat().st_size > 0


@pytest.mark.ray
def test_sweep_overhead_benchmark_reads_its_sweep_back(tmp_path):
    """bench_sweep_overhead runs a real 8-trial sweep (inline executor, a few steps each) and reads the
    busy time and start-ups back from MLflow."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sweep_overhead.py"), "--executors",
                           "inline", "--steps", "20"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| inline |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "8", row  # every trial read back
    assert 0 < int(cells[4].rstrip("%")) <= 100, row  # busy fraction
    # the lead-in, phase by phase, from the trials' own start-up metrics (new actors log actor_start_s)
    for phase in ("new trial actors: process start -> trial", "then trial start -> first step",
                  "of which the workload's set-up", "last training step -> end of command"):
        assert phase in proc.stdout, phase
