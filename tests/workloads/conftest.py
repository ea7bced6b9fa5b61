import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One prepared data cache for the whole test session: every workload test module that uses data
    points ATTNLAB_DATA here (modules opt in with `pytestmark = pytest.mark.usefixtures("data_cache")`)."""
    path = tmp_path_factory.getbasetemp() / "attnlab-data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLAB_DATA", str(path))
        yield path


def run_smoke(workload: str, *args: str) -> dict:
    """`python -m workloads.WORKLOAD --smoke ARGS`: must exit 0; returns its final metrics."""
    out = subprocess.run([sys.executable, "-m", f"workloads.{workload}", "--smoke", *args], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("final: ", 1)[1].splitlines()[0])
