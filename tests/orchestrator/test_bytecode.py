"""The sweep's bytecode cache: on for an install without bytecode that Python will not cache itself
(PYTHONDONTWRITEBYTECODE), inherited by child processes, off otherwise; and set before torch loads."""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, subprocess, sys
from orchestrator import bytecode
where = bytecode.cache_where_missing("probe_pkg")
import probe_pkg
child = subprocess.run([sys.executable, "-c",
                        "import sys; print(sys.pycache_prefix, sys.flags.dont_write_bytecode)"],
                       capture_output=True, text=True, check=True).stdout.split()
print(json.dumps({"where": str(where) if where else None, "child": child}))
"""


def _probe(tmp_path: Path, **env) -> dict:
    pkg = tmp_path / "src" / "probe_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    full.update({"PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(REPO)]), **env})
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_used_and_inherited_when_python_would_not_write_bytecode(tmp_path):
    cache = tmp_path / "cache"
    got = _probe(tmp_path, PYTHONDONTWRITEBYTECODE="1", ATTNLAB_BYTECODE_CACHE=str(cache))
    assert got["where"] == str(cache)
    # the probe's bytecode went to the cache, nothing beside the source
    assert [p.name for p in cache.rglob("*.pyc") if "probe_pkg" in str(p)] == [
        f"__init__.{sys.implementation.cache_tag}.pyc"]
    assert not (tmp_path / "src" / "probe_pkg" / "__pycache__").exists()
    # a process started afterwards (Ray's raylet and the trial actors it forks) uses the same cache
    assert got["child"] == [str(cache), "0"]


def test_nothing_changed_when_bytecode_is_there_or_turned_off(tmp_path):
    cache = tmp_path / "cache"
    off = _probe(tmp_path, PYTHONDONTWRITEBYTECODE="1", ATTNLAB_BYTECODE_CACHE="off")
    assert off["where"] is None and off["child"] == ["None", "1"]
    compileall.compile_dir(str(tmp_path / "src"), quiet=1)  # an install that ships its bytecode
    shipped = _probe(tmp_path, PYTHONDONTWRITEBYTECODE="1", ATTNLAB_BYTECODE_CACHE=str(cache))
    assert shipped["where"] is None and not cache.exists()


def test_sweep_cli_sets_the_cache_up_before_torch_is_imported(tmp_path):
    code = """
import runpy, sys
from orchestrator import bytecode
calls = []
bytecode.cache_where_missing = lambda probe="torch": calls.append("torch" in sys.modules)
sys.argv = ["orchestrator.sweep", "--help"]
try:
    runpy.run_module("orchestrator.sweep", run_name="__main__")
except SystemExit:
    pass
print("calls", calls)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    # called once, while torch was not loaded yet (the sweep loads it in run(), beside Ray's start)
    assert "calls [False]" in out
