"""Bad input fails before any trial starts and before anything is written (no runs/ folder), with exit
status 2, naming what was wrong and what is allowed, once, and never with a traceback."""

import subprocess
import sys
import time

import pytest

from tests.orchestrator.conftest import REPO, run_sweep

CASES = {
    "sweep": (["nosuchsweep"], ["unknown sweep 'nosuchsweep'", "allowed:", "colt5"]),
    "sweep typo": (["colt6"], ["unknown sweep 'colt6'", "did you mean 'colt5'?"]),
    "method": (["colt5", "--smoke", "--set", "attn.method=bogus"], ["unknown attention method 'bogus'", "allowed:",
                                                                   "softmax"]),
    "method typo": (["colt5", "--smoke", "--set", "attn.method=topkk"], ["did you mean 'topk'?"]),
    "value": (["colt5", "--smoke", "--set", "train.lr=5"], ["train.lr", "5", "allowed"]),
    "negative": (["colt5", "--smoke", "--set", "attn.heads=-1"], ["heads", "-1", ">= 1"]),
    "too many routed": (["colt5", "--smoke", "--set", "attn.method=colt5", "attn.num_routed_kv=100000"],
                        ["num_routed_kv", "100000", "<= 32"]),
    "knob": (["colt5", "--smoke", "--set", "attn.nosuchknob=3"], ["unknown field", "nosuchknob", "allowed"]),
    "knob typo": (["colt5", "--smoke", "--set", "attn.heds=2"], ["unknown field", "heds", "did you mean 'heads'?"]),
    "field typo": (["colt5", "--smoke", "--set", "train.step=2"], ["train: unknown field", "did you mean 'steps'?"]),
    # a section name with a typo is not ignored
    "section typo": (["colt5", "--smoke", "--set", "trian.steps=2"], ["--set trian", "no section",
                                                                     "did you mean 'train'?", "allowed:"]),
    "value as section": (["colt5", "--smoke", "--set", "seed.x=1"], ["--set seed.x", "seed is a value, not a section",
                                                                    "seed=VALUE"]),
    "section as value": (["colt5", "--smoke", "--set", "train=3"], ["--set train", "a section", "train.FIELD=VALUE"]),
    "other workload's section": (["colt5", "--smoke", "--set", "lora.rank=4"], ["--set lora",
                                                                               "workload 'lm' has no section"]),
    "no value": (["colt5", "--smoke", "--set", "steps"], ["--set", "expected KEY=VALUE"]),
    "workload": (["colt5", "--smoke", "--workload", "nosuchworkload"], ["workload", "nosuchworkload", "allowed",
                                                                       "lm"]),
    "search": (["colt5", "--smoke", "--search", "bayes"], ["--search", "bayes", "grid"]),
    "executor": (["colt5", "--smoke", "--executor", "fast"], ["--executor", "fast", "inline", "train"]),
    "inline data-parallel": (["colt5", "--smoke", "--executor", "inline", "--workers-per-trial", "2"],
                             ["--executor", "inline", "train"]),
    "no cpu": (["colt5", "--smoke", "--cpus-per-worker", "0"], ["--cpus-per-worker", "must be > 0", "got 0"]),
    "no worker": (["colt5", "--smoke", "--workers-per-trial", "0"], ["--workers-per-trial", "must be >= 1", "got 0"]),
    "negative gpus": (["colt5", "--smoke", "--gpus-per-trial", "-1"], ["--gpus-per-trial", "must be >= 0"]),
    "gpus absent": (["colt5", "--smoke", "--gpus-per-trial", "3"], ["--gpus-per-trial", "3 asked for", "GPUs"]),
    "cpus absent": (["colt5", "--smoke", "--workers-per-trial", "64"], ["--workers-per-trial", "64 workers", "CPUs"]),
    "concurrency": (["colt5", "--smoke", "--max-concurrent", "0"], ["--max-concurrent", "must be >= 1"]),
    "tracking scheme": (["colt5", "--smoke", "--tracking-uri", "foo://bar"], ["--tracking-uri", "foo://bar",
                                                                             "allowed schemes", "sqlite"]),
    "tracking server down": (["colt5", "--smoke", "--tracking-uri", "http://127.0.0.1:9"],
                             ["--tracking-uri", "no MLflow server answers", "http://127.0.0.1:9"]),
    "tracking folder": (["colt5", "--smoke", "--tracking-uri", "sqlite:////proc/nope/mlflow.db"],
                        ["--tracking-uri", "/proc/nope", "not writable"]),
    "storage folder": (["colt5", "--smoke", "--storage", "/proc/nope"], ["--storage", "/proc/nope", "not writable"]),
    "storage scheme": (["colt5", "--smoke", "--storage", "ftp://host/x"], ["--storage", "ftp://host/x", "s3"]),
    "nothing to resume": (["colt5", "--smoke", "--resume"], ["--resume", "no earlier run of sweep 'colt5'"]),
    "unknown sweep id": (["colt5", "--smoke", "--resume", "colt5-20200101-000000-abcdef"],
                         ["--resume", "has no saved state"]),
}
# As a user runs them: a process each (exit status, one error line, no traceback, nothing written).
# One case of each kind of check: the others go through the same code in-process below.
IN_A_PROCESS = ["sweep", "method", "section typo", "no cpu", "gpus absent", "tracking server down",
                "storage folder", "nothing to resume"]


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_input_fails_before_any_trial(workdir, case):
    args, expected = CASES[case]
    started = time.time()
    proc = run_sweep(args, workdir, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)
    assert proc.stderr.count("error: ") == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (workdir / "runs").exists(), "nothing may be written before the input is valid"
    assert time.time() - started < 100  # an unreachable MLflow server took 262 s to fail


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_check_names_the_field_and_what_is_allowed(workdir, monkeypatch, case):
    """What the sweep checks before Ray starts and beside its start (the knobs, on the meta device)."""
    from attention.config import ConfigError
    from orchestrator.cli import parse_args
    from orchestrator.spec import build_models
    from orchestrator.sweep import check_before_start, prepare

    monkeypatch.chdir(workdir)
    args, expected = CASES[case]
    with pytest.raises(ConfigError) as error:
        parsed = parse_args(args)
        check_before_start(parsed)
        build_models(prepare(parsed)[3])
    for text in expected:
        assert text in str(error.value), (text, str(error.value))
    assert not any(workdir.iterdir())


def test_report_reads_without_creating_a_store(workdir):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.report", "colt5"], cwd=workdir, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "no MLflow store at" in proc.stderr, proc.stderr
    assert not any(workdir.iterdir()), "orchestrator.report wrote into the current folder"


def test_help_lists_every_knob_with_its_default(workdir):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    sweep = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--help"], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 0 and "--scheduler" in sweep.stdout
    assert "workload lm (--set SECTION.FIELD=VALUE)" in sweep.stdout
    assert "train.steps" in sweep.stdout and "data.seq_len" in sweep.stdout and "lora.rank" in sweep.stdout
    alone = subprocess.run([sys.executable, "-m", "workloads.mqar", "--help"], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0
    assert any(line.split()[:2] == ["data.num_kv_pairs", "8"] for line in alone.stdout.splitlines()), alone.stdout
    assert not any(workdir.iterdir())
