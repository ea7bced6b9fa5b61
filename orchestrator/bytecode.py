"""Compile Python once per machine, not once per process.

An image built with uv's defaults ships no bytecode (`__pycache__`), and with PYTHONDONTWRITEBYTECODE
set Python never writes any: every process of a sweep (the driver, each trial's actor) then compiles
torch's Python source again on import. Measured on the H100 machine's image: `import torch` 3.0 s and
`import torch._dynamo` 3.9 s in every new process. When torch's bytecode is missing where Python looks
and Python would not write it, the sweep caches bytecode under a directory of its own instead
(`sys.pycache_prefix`, PEP 3147 files validated against the sources' mtimes as usual), and exports
PYTHONPYCACHEPREFIX so that the local Ray started by the sweep, and the trial actors it forks, use the
same cache. Nothing is written next to the installed sources.

ATTNLAB_BYTECODE_CACHE: the cache directory (default $XDG_CACHE_HOME/attnlab/pycache, or
~/.cache/attnlab/pycache), or "off" to leave Python's settings alone."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ENV = "ATTNLAB_BYTECODE_CACHE"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnlab" / "pycache"


def bytecode_missing(probe: str) -> bool:
    """True when Python will compile `probe`'s source on every import: no bytecode beside it, and Python
    will not write one (bytecode writing off, or the package directory read-only)."""
    spec = importlib.util.find_spec(probe)  # for a top-level package this imports nothing
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    if os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return False
    return sys.dont_write_bytecode or not os.access(os.path.dirname(spec.origin), os.W_OK)


def cache_where_missing(probe: str = "torch") -> Path | None:
    """Turn the bytecode cache on for this process and the processes it starts, if `probe` (the
    heaviest import of a trial) would otherwise be compiled on every import. Call it before importing
    `probe`. Returns the cache directory, or None when nothing was changed."""
    setting = os.environ.get(ENV, "")
    if setting.lower() == "off" or os.environ.get("PYTHONPYCACHEPREFIX") or sys.pycache_prefix:
        return None  # turned off, or the user already chose where bytecode goes
    if not bytecode_missing(probe):
        return None
    where = Path(setting).expanduser() if setting else default_dir()
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"note: {ENV}: cannot create {where} ({e}); Python will compile on every import",
              file=sys.stderr)
        return None
    sys.pycache_prefix = str(where)
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = str(where)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return where
