"""A sweep's life: its id, the lock that keeps two processes from running it at once, the resume
pointer, stop signals, and how each trial's run is closed when the sweep ends or is interrupted."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from attention.config import ConfigError
from orchestrator.locations import Locations


def new_sweep_id(name: str) -> str:
    """Unique even for sweeps started in the same second (they would share a Tune folder)."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def pointer_path(locations: Locations, name: str) -> Path | None:
    folder = locations.local_storage
    return folder / f"{name}.latest" if folder is not None else None


def sweep_to_resume(locations: Locations, name: str, resume: str) -> str:
    """The sweep id --resume names ('latest': the last sweep of this name in this storage), checked
    before anything starts. Remote storage keeps no pointer: the id must be given."""
    folder = locations.local_storage
    if resume == "latest":
        pointer = pointer_path(locations, name)
        if pointer is None:
            raise ConfigError(f"--resume: with remote storage ({locations.storage}) give the sweep id, "
                              f"e.g. --resume {name}-20260101-120000-a1b2c3 (printed when the sweep started)")
        if not pointer.exists():
            raise ConfigError(f"--resume: no earlier run of sweep {name!r} under {locations.storage}")
        resume = pointer.read_text().strip()
    if folder is not None and not (folder / resume).is_dir():
        raise ConfigError(f"--resume: sweep {resume!r} has no saved state under {folder}")
    return resume


class SweepLock:
    """An exclusive lock on one sweep in its storage folder, held for the process's life (the kernel
    drops it when the process dies, however it dies). Remote storage has no lock (see docs/sweeps.md)."""

    def __init__(self, locations: Locations, sweep_id: str):
        folder = locations.local_storage
        self.path = folder / f"{sweep_id}.lock" if folder is not None else None
        self.sweep_id = sweep_id
        self._fd: int | None = None

    def acquire(self) -> SweepLock:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"--resume: sweep {self.sweep_id!r} is being run by {holder}; wait for it to end "
                              f"or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a waiter)
            self._fd = None


class Interruption:
    """Ctrl-C and SIGTERM (`ray job stop`, a pod's end, `kill`) do the same. During the trials the first
    one asks Tune to save its state and stop them (through the SIGUSR1 handler Tune installs for this)
    and is remembered, so the sweep can tell an interrupted trial from a finished one: Tune marks both
    TERMINATED. A second one, or one outside the trials, raises KeyboardInterrupt."""

    def __init__(self):
        self.signal: int | None = None
        self._in_trials = False
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # SIGINT is handled here, not by Tune

    def install(self) -> Interruption:
        """Call again after Ray's start: it installs a SIGTERM handler of its own."""
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    @contextlib.contextmanager
    def during_trials(self):
        self._in_trials = True
        try:
            yield self
        finally:
            self._in_trials = False

    def _handle(self, signum, frame):
        if self._in_trials and self.signal is None:
            self.signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping the trials; Tune saves the sweep's state "
                  f"(send it again to skip that)", file=sys.stderr, flush=True)
            tune_handler = signal.getsignal(signal.SIGUSR1)
            if callable(tune_handler):
                tune_handler(signum, frame)
                return
        self.signal = self.signal or signum
        raise KeyboardInterrupt


def done_trials(runs: list) -> frozenset[str]:
    """Trials a resumed sweep must not run again, whatever Tune's saved state says (it may lag behind):
    finished, stopped by the scheduler, or diverged."""
    return frozenset(r.data.tags.get("trial_id") for r in runs
                     if r.info.status == "FINISHED" or r.data.tags.get("stopped_early") == "true"
                     or r.data.tags.get("diverged") == "true")


@dataclasses.dataclass
class Summary:
    finished: int = 0
    stopped: int = 0
    diverged: int = 0
    failed: int = 0
    interrupted: int = 0
    not_started: int = 0

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def line(self) -> str:
        parts = [f"{self.finished} finished"]
        parts += [f"{n} {label}" for n, label in ((self.stopped, "stopped early"), (self.diverged, "diverged"),
                                                   (self.failed, "failed"), (self.interrupted, "interrupted"),
                                                   (self.not_started, "not started")) if n]
        return f"{self.total} trials: " + ", ".join(parts)


def close_trial_runs(client, parent_id: str, interrupted: bool, errored: set[str], trials: int,
                     checkpoints: dict[str, str]) -> Summary:
    """Close every child run still RUNNING by how its trial ended, and count them all. A trial that ends
    by itself closes its own run; one still RUNNING was stopped by the scheduler (tagged), failed
    (`errored`: the trial ids Tune reports an error for), or was interrupted. `trials`: how many the
    sweep has; `checkpoints`: trial id -> last checkpoint, logged for trials the scheduler stopped."""
    from orchestrator import tracking
    from orchestrator.executors import log_checkpoint

    summary = Summary()
    runs = tracking.child_runs(client, parent_id)
    for run in runs:
        status = _final_status(run, interrupted, errored)
        if run.info.status == "RUNNING":
            run_id, trial_id = run.info.run_id, run.data.tags.get("trial_id")
            if status == "interrupted":  # Tune saved its state: --resume continues it from its checkpoint
                tracking.set_tags(client, run_id, {"interrupted": "true"})
                client.set_terminated(run_id, status="KILLED")
            elif status == "stopped":
                if checkpoints.get(trial_id):
                    log_checkpoint(client, run_id, checkpoints[trial_id])
                client.set_terminated(run_id, status="FINISHED")
            else:
                client.set_terminated(run_id, status="FAILED")
        setattr(summary, status, getattr(summary, status) + 1)
    summary.not_started = max(0, trials - len(runs))
    return summary


def _final_status(run, interrupted: bool, errored: set[str]) -> str:
    """How the trial ended: its run's tags first, then Tune's record of errors, then the run's status."""
    tags, status = run.data.tags, run.info.status
    if tags.get("diverged") == "true":
        return "diverged"
    if tags.get("stopped_early") == "true":
        return "stopped"
    if tags.get("trial_id") in errored or status == "FAILED":
        return "failed"
    if status == "FINISHED":
        return "finished"
    # still RUNNING (or KILLED by an earlier session): cut short by the interruption, or it broke
    return "interrupted" if interrupted or status == "KILLED" else "failed"


def write_pointer(locations: Locations, name: str, sweep_id: str) -> None:
    pointer = pointer_path(locations, name)
    if pointer is not None:
        pointer.write_text(sweep_id)


def cluster_tag(cluster: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory")})
