import os

import pytest
import torch

# Ray started by tests never turns on token auth or writes a token into the home directory.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Datasets prepared by tests go to a cache the tests share (prepared once per machine).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny ops: with two OpenMP threads on a busy 2-core machine
    they spin-wait (up to 50x slower). Modules opt in with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
