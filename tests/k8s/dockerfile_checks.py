"""A documented check of docker/Dockerfile, beside hadolint, for what a linter can't know:

- every base image is pinned (a tag that is not `latest`, or a digest), ARG defaults resolved;
- every stage ends as a numeric non-root USER (the kubelet can only verify runAsNonRoot on a number);
- no ADD (COPY is explicit), no `curl | sh`, every pip requirement pinned with == (or a local path);
- every COPY source exists in the repository and is not excluded by .dockerignore (else the build
  fails, or silently copies nothing);
- the versions it pins satisfy pyproject.toml (torch, mlflow).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments and blank lines dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        current += " " + stripped
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.strip():
            lines.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def stages(text: str) -> dict[str, dict]:
    """Stage name -> {"image": resolved base, "args": ARG defaults, "instructions": [...]}."""
    global_args: dict[str, str] = {}
    result: dict[str, dict] = {}
    stage = None
    for op, arguments in instructions(text):
        if op == "ARG" and stage is None:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif op == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(result))
            stage = result[name] = {
                "image": _substitute(words[0], global_args),
                "args": {},
                "instructions": [],
            }
        elif stage is not None:
            if op == "ARG":
                name, _, default = arguments.partition("=")
                stage["args"][name] = default or global_args.get(name, "")
            stage["instructions"].append((op, arguments))
    return result


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes path: the last pattern matching it or a parent decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        body = body.strip().strip("/")
        regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negated
    return excluded


def read_dockerignore(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def _image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest") and "$" not in image


def dockerfile_problems(dockerfile: Path, repo_root: Path) -> list[str]:
    text = dockerfile.read_text()
    ignore = read_dockerignore(repo_root / ".dockerignore")
    problems = []
    for name, stage in stages(text).items():
        where = f"stage {name}"
        if not _image_pinned(stage["image"]):
            problems.append(f"{where}: base image {stage['image']!r} is not pinned")
        users = [a for op, a in stage["instructions"] if op == "USER"]
        if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1].strip()):
            problems.append(f"{where}: must end with a numeric non-root USER (got {users[-1:] or 'none'})")
        for op, arguments in stage["instructions"]:
            resolved = _substitute(arguments, stage["args"])
            if op == "ADD":
                problems.append(f"{where}: ADD {arguments} (use COPY)")
            if op == "RUN" and re.search(r"(curl|wget)[^|;&]*\|\s*(ba)?sh", resolved):
                problems.append(f"{where}: pipes a download into a shell")
            if op == "RUN" and "pip install" in resolved:
                problems += [f"{where}: {p}" for p in _unpinned_requirements(resolved)]
            if op == "COPY" and not arguments.startswith("--from"):
                for source in shlex.split(arguments)[:-1]:
                    if source.startswith("--"):
                        continue
                    if not (repo_root / source).exists():
                        problems.append(f"{where}: COPY source {source} does not exist")
                    elif dockerignore_excludes(source, ignore):
                        problems.append(f"{where}: COPY source {source} is excluded by .dockerignore")
    return problems


def _unpinned_requirements(run: str) -> list[str]:
    problems = []
    for command in re.split(r"&&|;", run):
        words = shlex.split(command)
        if words[:2] != ["pip", "install"]:
            continue
        skip_next = False
        for word in words[2:]:
            if skip_next or word.startswith("-"):
                skip_next = word in ("--index-url", "--extra-index-url", "-r", "-c")
                continue
            if word.startswith(("/", ".")):
                continue  # a local project: its dependencies are pinned in its own metadata
            if len(Requirement(word).specifier) != 1 or "==" not in str(Requirement(word).specifier):
                problems.append(f"pip requirement {word!r} is not pinned with ==")
    return problems


def pinned_versions(dockerfile: Path) -> dict[str, str]:
    """ARG defaults that name versions (MLFLOW_VERSION, TORCH_VERSION, ...), from every stage."""
    versions = {}
    for stage in stages(dockerfile.read_text()).values():
        versions.update({k: v for k, v in stage["args"].items() if k.endswith("_VERSION") and v})
    return versions


def satisfies(version: str, requirement: str) -> bool:
    return Version(version) in Requirement(requirement).specifier


def copy_like_docker(stage: dict, repo_root: Path, image_dir: str, into: Path) -> None:
    """Reproduce a stage's COPY instructions whose destination lies under image_dir, into `into`:
    the files `pip install image_dir` sees in the image (.dockerignore applied).
    """
    ignore = read_dockerignore(repo_root / ".dockerignore")
    for op, arguments in stage["instructions"]:
        if op != "COPY" or arguments.startswith("--"):
            continue
        *sources, destination = shlex.split(arguments)
        if not destination.rstrip("/").startswith(image_dir.rstrip("/")):
            continue
        target = into / destination[len(image_dir.rstrip("/")) :].strip("/")
        for source in sources:
            path = repo_root / source
            files = [path] if path.is_file() else [f for f in sorted(path.rglob("*")) if f.is_file()]
            for file in files:
                relative = file.relative_to(repo_root).as_posix()
                if dockerignore_excludes(relative, ignore):
                    continue
                if path.is_file():
                    out = target / file.name if destination.endswith("/") or len(sources) > 1 else target
                else:
                    out = target / file.relative_to(path)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, out)
