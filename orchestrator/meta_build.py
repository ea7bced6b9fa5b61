"""Building a model on the meta device to validate it: no memory, no data, no random fills."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _SkipRandomInitOnMeta(torch.overrides.TorchFunctionMode):
    """On meta tensors, random in-place fills (normal_, ...) do nothing and randn/rand give empty tensors.

    Torch runs those through its Python decompositions on the meta device, whose first use imports
    torch._dynamo (about 1 s here, 5 s on the GPU machine). A meta tensor has no values to fill, so
    nothing validation checks (shapes, dtypes, config errors) changes. Some other meta ops still take
    that path (a scalar multiply in a constructor): build_models runs beside Ray's start for that."""

    # Tensor methods, then torch.nn.init's functions (which pass their tensor by keyword)
    RANDOM_FILLS = frozenset({"normal_", "exponential_", "log_normal_", "cauchy_", "geometric_", "random_",
                              "trunc_normal_", "kaiming_normal_", "xavier_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.randn, torch.rand) and kwargs.get("device") in (None, "meta"):
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)  # the device context makes it meta
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
        if getattr(func, "__name__", "") in self.RANDOM_FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def build_on_meta(build: Callable[[], nn.Module]) -> None:
    try:
        with torch.device("meta"), _SkipRandomInitOnMeta():
            build()
    except (RuntimeError, NotImplementedError):
        build()  # a module that computes at init (random features): build it for real
