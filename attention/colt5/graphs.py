"""CUDA graphs for the causal CoLT5 modules: per input shape, the forward (and, with autograd, the
backward) captured once and replayed.

Why: the routed modules are a few hundred small kernels per layer (routers, gathers, the small batched
attention, scatters); eager, a step at T = 16k spends more time launching them than the GPU spends
running them (docs/benchmarks.md). A replay launches them all at once. The kernels are the same, so
outputs and gradients are those of the eager forward.

When: `cuda_graphs=True` (the default), a CUDA input, no padding mask, not inside another capture or
torch.compile, and not over the cache's shape limit; anything else runs eagerly. As with any CUDA graph,
the outputs of one replay are overwritten by the next: a module called twice before one backward
(shared weights) needs cuda_graphs=false. Under autocast the capture runs with the
autocast cache off (what capture requires). The graphs keep their own memory pools (the
intermediates of one step, per shape and mode), allocated at capture: the allocator's peak during a
replay does not show them. A capture that fails warns once and leaves the module eager.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

MAX_SHAPES = 8  # captured (shape, mode) entries per module; beyond, new shapes run eagerly


class _Core(nn.Module):
    """The owner's eager forward as a module whose parameters are the owner's (what capture needs)."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.owner = owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.forward_eager(x)


class GraphedForward:
    """graphed(x) -> the owner's forward_eager(x) replayed from a CUDA graph, or None when not applicable."""

    def __init__(self, owner: nn.Module):
        self.owner = owner
        self.entries: dict[tuple, tuple] = {}
        self.failed = False

    def __deepcopy__(self, memo):  # a copied module starts without graphs (they are not copyable)
        return GraphedForward(memo.get(id(self.owner), self.owner))

    def __getstate__(self):
        return {"owner": self.owner, "entries": {}, "failed": False}

    def _key(self, x: torch.Tensor) -> tuple:
        autocast = torch.is_autocast_enabled("cuda")
        params = tuple(p.data_ptr() for p in self.owner.parameters())  # a moved module recaptures
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(), self.owner.training,
                autocast, torch.get_autocast_dtype("cuda") if autocast else None, params)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if (self.failed or mask is not None or not x.is_cuda or torch.compiler.is_compiling()
                or torch.cuda.is_current_stream_capturing()):
            return None
        key = self._key(x)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= MAX_SHAPES:
                return None
            try:
                entry = self.entries[key] = self._capture(x, key)
            except Exception as err:  # eager from now on; the run goes on
                self.failed = True
                warnings.warn(f"colt5: CUDA graph capture failed ({type(err).__name__}: {err}); running eagerly",
                              stacklevel=3)
                return None
        kind, graph, aux, static_x, static_out = entry
        self.owner.aux = aux
        if kind == "train":
            return graph(x)
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()

    def _autocast(self, key: tuple):
        autocast, dtype = key[6], key[7]
        return torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=autocast, cache_enabled=False)

    def _capture(self, x: torch.Tensor, key: tuple) -> tuple:
        owner = self.owner
        with self._autocast(key):
            if torch.is_grad_enabled():
                core = _Core(owner).train(owner.training)
                sample = x.detach().clone().requires_grad_(x.requires_grad)
                graphed = torch.cuda.make_graphed_callables(core, (sample,), allow_unused_input=True)
                return "train", graphed, owner.aux, None, None
            static_x = x.detach().clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy initialisation (kernel compilation, workspaces) outside the capture
                    owner.forward_eager(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = owner.forward_eager(static_x)
            return "forward", graph, owner.aux, static_x, static_out
