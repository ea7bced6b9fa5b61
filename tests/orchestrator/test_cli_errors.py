"""Bad input fails before any trial starts and before anything is written (no runs/ folder), naming what
was wrong and what is allowed, once (the knobs are checked beside Ray's start, and shown at once)."""

import pytest

from tests.orchestrator.conftest import run_sweep


@pytest.mark.parametrize("args, expected", [
    (["nosuchsweep"], ["unknown sweep 'nosuchsweep'", "allowed:", "colt5"]),
    (["colt5", "--smoke", "--set", "attn.method=bogus"], ["unknown attention method 'bogus'", "allowed:",
                                                         "softmax"]),
    (["colt5", "--smoke", "--set", "train.lr=5"], ["train.lr", "5", "allowed"]),
    (["colt5", "--smoke", "--set", "attn.heads=-1"], ["heads", "-1", ">= 1"]),
    (["colt5", "--smoke", "--set", "attn.method=colt5", "attn.num_routed_kv=100000"],
     ["num_routed_kv", "100000", "<= 32"]),
    (["colt5", "--smoke", "--set", "attn.nosuchknob=3"], ["unknown field", "nosuchknob", "allowed"]),
    (["colt5", "--smoke", "--workload", "nosuchworkload"], ["workload", "nosuchworkload", "allowed", "lm"]),
    (["colt5", "--smoke", "--search", "bayes"], ["--search", "bayes", "grid"]),
    (["colt5", "--smoke", "--executor", "fast"], ["--executor", "fast", "inline", "train"]),
    (["colt5", "--smoke", "--executor", "inline", "--workers-per-trial", "2"], ["--executor", "inline", "train"]),
])
def test_bad_input_fails_before_any_trial(workdir, args, expected):
    proc = run_sweep(args, workdir, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)
    assert proc.stderr.count("error: ") == 1, proc.stderr
    assert not (workdir / "runs").exists(), "nothing may start before the config is valid"
