"""Starting and joining Ray for a sweep.

Embedded (no --address, not inside a Ray job): a local Ray that only this machine can reach. Ray 2.60
binds its servers (GCS, raylet, workers, agents) to every interface and turns a loopback node address
into the machine's outward one, except when it is told that clusters are off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what it does on macOS and Windows): then every server listens
on 127.0.0.1. The variable is read when Ray is imported, so `use_loopback_only` runs first.

Joining a cluster (--address): the trials' workers do not see this shell's environment, so attnlab's
and MLflow's settings are passed on in the job's runtime env, except credentials: a runtime env is
written to Ray's logs and served by its dashboard (/api/jobs/, /api/v0/actors) to whoever can reach
it. Clusters give their workers credentials from their own secrets (k8s/ mounts them)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

FORWARDED_PREFIXES = ("ATTNLAB_", "MLFLOW_", "HF_")
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY", "CREDENTIAL", "AUTH")
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def embedded(address: str | None) -> bool:
    """True when the sweep starts its own Ray (neither --address nor a Ray job's RAY_ADDRESS)."""
    return not address and not os.environ.get("RAY_ADDRESS")


def use_loopback_only() -> None:
    """Before Ray is imported: the local Ray this process starts listens on loopback only, and needs no
    token (nothing else can reach it). A cluster the user already runs locally keeps its own settings."""
    if "ray" in sys.modules:
        raise RuntimeError("use_loopback_only() must run before Ray is imported")
    os.environ.setdefault(LOOPBACK_ENV, "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def is_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def forwarded_env(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(what goes to a cluster's workers, the names of the credentials held back)."""
    chosen = {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES)}
    withheld = sorted(k for k in chosen if is_secret(k))
    return {k: v for k, v in chosen.items() if k not in withheld}, withheld


def start(address: str | None, verbose: bool = False) -> None:
    """verbose: every trial's own output (Ray forwards the workers' stdout and stderr) in this console."""
    import ray

    if address:
        env, withheld = forwarded_env(dict(os.environ))
        if withheld:
            print(f"note: not passing {', '.join(withheld)} to the cluster (Ray logs a job's environment and "
                  f"serves it on its dashboard): give the cluster's workers credentials from its own secrets",
                  file=sys.stderr)
        ray.init(address=address, log_to_driver=verbose, runtime_env={"env_vars": env} if env else None)
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job's runtime env already applies
        ray.init(address="auto", log_to_driver=verbose)
        return
    _forget_dead_local_cluster()
    # the dashboard on: without it, a second trial's workers were seen never to start (ENVIRONMENT.md)
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=verbose,
             configure_logging=True, logging_level="INFO" if verbose else "WARNING")


def _forget_dead_local_cluster() -> None:
    """`ray start` records the local cluster it starts in Ray's temp dir; ray.init() attaches to it, and
    so do Ray's state API calls inside trials. A cluster that died without `ray stop` leaves the record
    behind and both hang on it: drop a record whose address answers nothing (what `ray stop` would do)."""
    record = _ray_address_record()
    try:
        recorded = record.read_text().strip()
    except OSError:
        return
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return  # alive: ray.init() joins it, as Ray does by default
    except (OSError, ValueError):
        pass
    print(f"note: Ray's record of a local cluster at {recorded} is stale (nothing answers); starting a new one",
          file=sys.stderr)
    record.unlink(missing_ok=True)


def _ray_address_record() -> Path:
    """Where Ray keeps it: its temp dir (RAY_TMPDIR, else TMPDIR on Linux, else /tmp), then ray/."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray" / "ray_current_cluster"


def local_gpus() -> int:
    """GPUs a local Ray will see, without starting it (or importing torch): CUDA_VISIBLE_DEVICES, else
    NVML's count."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return 0


def local_resources() -> dict[str, float]:
    """What a local Ray would offer: every CPU and GPU of this machine."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(local_gpus())}
