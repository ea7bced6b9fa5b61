import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Waits sized for a loaded 2-core machine (the suite and other work beside it), not an idle one.
SWEEP_TIMEOUT_S = 900


def sweep_env(env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}


def run_sweep(args: list[str], cwd: Path, timeout: float = SWEEP_TIMEOUT_S, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """`python -m orchestrator.sweep ...` as a user runs it, in its own process and working dir."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=sweep_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_sweep(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The same, in the background (to signal it while it runs); output kept in cwd/sweep-<pid>.log."""
    log = open(cwd / f"sweep-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=cwd, env=sweep_env(env),
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = SWEEP_TIMEOUT_S) -> str:
    """Wait for a started sweep; its whole output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.log.seek(0)
    return proc.log.read()


def runs(db: Path, sweep: str):
    """(client, parent runs, child runs) of a sweep in a sqlite store, ([] []) while it has none."""
    from mlflow.tracking import MlflowClient

    if not db.exists():
        return None, [], []
    client = MlflowClient(f"sqlite:///{db}")
    try:
        exp = client.get_experiment_by_name(sweep)
    except Exception:  # the store is being created
        return client, [], []
    if exp is None:
        return client, [], []
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in found if "mlflow.parentRunId" in r.data.tags]


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300, what: str = "the condition"):
    """Poll condition() until it returns something truthy; fail with the sweep's output if the sweep ends
    or the time runs out first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    output = finish(proc, timeout=5) if proc.poll() is not None else "(still running)"
    if proc.poll() is None:
        proc.kill()
    pytest.fail(f"{what} never happened:\n{output[-4000:]}")


def trials_training(db: Path, sweep: str, count: int):
    """The client and child runs once `count` trials are RUNNING and each has logged a training step."""
    client, _, children = runs(db, sweep)
    running = [c for c in children if c.info.status == "RUNNING"]
    if len(running) >= count and all(client.get_metric_history(c.info.run_id, "train/loss") for c in running):
        return client, running
    return None


def leftovers(scratch: Path, since: float) -> list[str]:
    """What a sweep left in its scratch folder, and any checkpoint folder (`ckpt-*`, `best-*`, where the
    lab kept them before the scratch folder) made since `since` in the system's temp dir."""
    import tempfile

    found = [str(p) for p in scratch.iterdir()] if scratch.exists() else []
    for pattern in ("ckpt-*", "best-*"):
        found += [str(p) for p in Path(tempfile.gettempdir()).glob(pattern) if p.stat().st_mtime >= since]
    return found


def steps_of(client, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def listening_addresses(pid: int) -> list[str]:
    """The addresses every process of `pid`'s tree listens on."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            found += [c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.fixture
def workdir(tmp_path):
    return tmp_path
