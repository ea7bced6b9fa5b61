"""Checkpoint files that hold data only: tensors, numbers, strings and containers of them.

Every checkpoint the lab reads goes through `load`, which unpickles with `weights_only=True`: a file
that names any other Python object (a crafted `state.pt` handed over as a teacher or a base model, or
pulled from an MLflow artifact store someone else can write to) is refused before any of it runs. So
the training state is saved in those types alone: the RNG states as tensors and plain tuples."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeCheckpoint(ValueError):
    """The file asks the unpickler for something other than plain data."""


def load(path: str | Path, field: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """The contents of a checkpoint saved by torch.save, refusing anything but plain data. `field`
    names the option the path came from in the error message."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests loading without the restriction; what the user needs is the object it named
        lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise UnsafeCheckpoint(
            f"{field}: {str(path)!r} is not a plain-data checkpoint and was not loaded (loading it could run "
            f"code it carries): {lines[0].strip() if lines else 'not plain data'}") from None


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's generator states, in types `load` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a list after a round trip through some writers
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
