import pytest

from workloads.common.cli import main as run_workload
from workloads.lm import WORKLOAD
from workloads.lm.sample import main as sample


@pytest.mark.parametrize("method", ["linear", "softmax"])
def test_a_trained_run_dir_generates_text(tmp_path, method, capsys):
    run_workload(WORKLOAD, ["--smoke", "--method", method, "--run-dir", str(tmp_path)])
    text = sample(["--run-dir", str(tmp_path), "--prompt", "The ", "--tokens", "20", "--temperature", "0"])
    assert text.startswith("The ") and len(text.encode("utf-8", errors="replace")) >= 20
    mode = "recurrent state" if method == "linear" else "full forward"
    assert mode in capsys.readouterr().out
