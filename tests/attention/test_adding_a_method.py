"""docs/methods.md's worked example, kept honest: its files are written out as a package of their own,
installed the way pip installs one (a .dist-info whose entry point names the package, on the path),
and the method is found, builds, matches its reference in float64, trains a step, and takes part in a
sweep's validation, which rejects a stride that cannot act."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def doc_files() -> dict[str, str]:
    """{path: content} of the code blocks that docs/methods.md introduces with 'File `path`'."""
    text = (REPO / "docs" / "methods.md").read_text()
    blocks = re.findall(r"File `([^`]+)`[^\n]*\n\n```[a-z]*\n(.*?)```", text, flags=re.S)
    return dict(blocks)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    files = doc_files()
    assert {"attnlab_strided/config.py", "attnlab_strided/reference.py", "attnlab_strided/mixer.py",
            "attnlab_strided/__init__.py", "pyproject.toml"} <= set(files)
    for path, content in files.items():
        if path.startswith("attnlab_strided/"):
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            (site / path).write_text(content)
    # what pip writes for the package: its metadata and, from the pyproject's entry-point table, this file
    group, line = re.search(r'\[project\.entry-points\."([^"]+)"\]\n(.+)', files["pyproject.toml"]).groups()
    dist = site / "attnlab_strided-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attnlab-strided\nVersion: 0.1\n")
    entry = line.replace(" ", "").replace('"', "")  # strided="attnlab_strided" -> strided=attnlab_strided
    (dist / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    return site


def run(site: Path, code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={"PYTHONPATH": f"{REPO}:{site}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_documented_method_is_found_builds_and_matches_its_reference(installed):
    out = run(installed, """
import torch, attention
from attnlab_strided.reference import strided_attention_reference
assert "strided" in attention.methods(), attention.methods()
cfg = attention.make_config("strided", stride=3, causal=True, heads=2)
mixer = attention.build(cfg, 16).double()
x = torch.randn(2, 11, 16, dtype=torch.float64)
mask = torch.ones(2, 11, dtype=torch.bool); mask[1, 7:] = False
y = mixer(x, mask=mask)
q, k, v = mixer.qkv(x)
ref = strided_attention_reference(q, k, v, stride=3, causal=True, key_mask=mask)
expected = mixer.to_out(ref.flatten(2)) * mask[..., None]
torch.testing.assert_close(y, expected)
y.square().sum().backward()
assert all(p.grad is not None for p in mixer.parameters())
print("ok", attention.get("strided").description)
""")
    assert out.startswith("ok attention to every stride-th key")


def test_a_sweep_takes_it_and_rejects_a_stride_that_cannot_act(installed):
    out = run(installed, """
from ray import tune
from attention.config import ConfigError
from orchestrator.spec import Profile, SweepSpec, grid, param_space, validate
ok = SweepSpec("s", "", "lm", cpu=Profile(space={"attn": tune.grid_search(grid("strided", stride=[2, 4]))},
                                          seeds=(0,)))
print(validate(param_space(ok, "cpu")))
dead = SweepSpec("s", "", "lm", cpu=Profile(space={"attn": tune.grid_search(grid("strided", stride=[128]))},
                                            seeds=(0,)))
try:
    validate(param_space(dead, "cpu"))
except ConfigError as e:
    print(e)
""")
    count, error = out.strip().splitlines()[:2]
    assert count == "2"
    assert "strided.stride: stride=128 in 128-token sequences is not a sparse pattern" in error


def test_a_broken_method_package_says_which_one(installed, tmp_path):
    broken = tmp_path / "site"
    broken.mkdir()
    (broken / "attnlab_broken.py").write_text("raise RuntimeError('boom')\n")
    dist = broken / "attnlab_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attnlab-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[attnlab.methods]\nbroken = attnlab_broken\n")
    out = subprocess.run([sys.executable, "-c", "import attention; attention.methods()"], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env={"PYTHONPATH": f"{REPO}:{broken}", "PATH": "/usr/bin"})
    assert out.returncode != 0
    assert "attention method package 'attnlab_broken' (entry point 'broken' in 'attnlab.methods') failed" \
        in out.stderr
