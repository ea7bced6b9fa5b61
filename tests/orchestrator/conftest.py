import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_sweep(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """`python -m orchestrator.sweep ...` as a user runs it, in its own process and working dir."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def workdir(tmp_path):
    return tmp_path
