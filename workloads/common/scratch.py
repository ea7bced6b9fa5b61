"""Scratch directories (checkpoints on their way to a reporter, a trial's best checkpoint) that never
outlive their use for long.

A process removes its own directories when done with them, but a trial actor can be stopped between
two lines (a scheduler's stop) or killed outright (SIGKILL, out of memory), and then cannot. So every
directory is named for the process that made it, under one folder per user, and whoever makes a new
one first removes those whose process has gone."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def root() -> Path:
    """$ATTNLAB_SCRATCH (a sweep passes it on to a cluster's workers), else a folder per user in the
    system's temp dir."""
    chosen = os.environ.get("ATTNLAB_SCRATCH")
    return Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"attnlab-scratch-{os.getuid()}"


def make(kind: str) -> str:
    """A new empty directory `<root>/<pid>-<kind>-XXXX`."""
    folder = root()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_orphans()
    return tempfile.mkdtemp(prefix=f"{os.getpid()}-{kind}-", dir=folder)


def remove_orphans() -> list[str]:
    """Remove the directories whose process is gone; returns their names."""
    removed = []
    try:
        entries = list(root().iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
