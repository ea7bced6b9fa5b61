"""Each package depends only downward (DESIGN.md): attention imports neither workloads nor orchestrator
(nor Ray, nor MLflow); workloads import neither orchestrator nor Ray nor MLflow; the orchestrator sees
the workloads only through workloads.contract. Checked on every import statement of every module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports(package: str):
    """(module file, imported module name) for every import in the package, lazy ones included."""
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                yield from ((path, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                # `from workloads import contract` names the module workloads.contract
                yield from ((path, f"{node.module}.{alias.name}") for alias in node.names)


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("package, forbidden", [
    ("attention", ("workloads", "orchestrator", "ray", "mlflow")),
    ("workloads", ("orchestrator", "ray", "mlflow")),
])
def test_packages_import_only_downward(package, forbidden):
    wrong = [f"{path.relative_to(REPO)}: {name}" for path, name in imports(package) if _under(name, forbidden)]
    assert wrong == []


def test_the_orchestrator_sees_the_workloads_only_through_the_contract():
    wrong = [f"{path.relative_to(REPO)}: {name}" for path, name in imports("orchestrator")
             if _under(name, ("workloads",)) and not _under(name, ("workloads.contract",))]
    assert wrong == []


def test_training_a_workload_loads_no_ray_and_no_mlflow(tmp_path):
    code = ("import sys; from workloads import contract; "
            "contract.get('lm').train(contract.get('lm').config(smoke=True), contract.LocalReporter(quiet=True)); "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "ATTNLAB_DATA": str(tmp_path), "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
