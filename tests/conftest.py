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
