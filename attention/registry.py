"""Name -> MethodSpec. Every method package registers itself when `attention` is imported."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from attention.config import ConfigError, MethodConfig, closest


@dataclasses.dataclass(frozen=True)
class Capabilities:
    causal: bool = True          # supports causal=True
    cross: bool = False          # accepts context=(B, S, dim)
    padding_mask: bool = True    # honours mask=(B, T) bool, True = real token
    recurrent: bool = False      # has init_state/step for O(1)-per-token decoding


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    factory: Callable[[Any, int], nn.Module]
    capabilities: Capabilities
    description: str = ""
    # A method may bring its own feed-forward for the transformer block (CoLT5's routed one).
    feedforward: Callable[[Any, int], nn.Module] | None = None


ENTRY_POINT_GROUP = "attnlab.methods"
_REGISTRY: dict[str, MethodSpec] = {}
_discovered = False


def register(name: str, config_cls: type[MethodConfig], capabilities: Capabilities,
             description: str = "", feedforward: Callable[[Any, int], nn.Module] | None = None):
    """Decorator for a mixer factory `(cfg, dim) -> nn.Module`."""
    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise RuntimeError(f"method {name!r} registered twice")
        config_cls.method = name
        _REGISTRY[name] = MethodSpec(name, config_cls, factory, capabilities, description, feedforward)
        return factory
    return deco


def _discover() -> None:
    # Each method is a subpackage of `attention` that registers itself on import; importing them all
    # here keeps the list of methods in one place: the folders.
    global _discovered
    if _discovered:
        return
    _discovered = True
    import attention
    for info in sorted(pkgutil.iter_modules(attention.__path__), key=lambda m: m.name):
        if info.ispkg:
            importlib.import_module(f"attention.{info.name}")
    # Methods from installed packages: an entry point in the group `attnlab.methods` names a module that
    # registers its methods when imported (docs/methods.md, "Adding a method").
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as e:
            raise ImportError(f"attention method package {entry.value!r} (entry point {entry.name!r} in "
                              f"{ENTRY_POINT_GROUP!r}) failed to import: {e}") from e


def methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> MethodSpec:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attention method {name!r}{closest([name], methods())}; "
                          f"allowed: {', '.join(methods())}")
    return _REGISTRY[name]


def make_config(name: str, values: Mapping[str, Any] | None = None, **fields: Any) -> MethodConfig:
    """`make_config("topk", k=8)` or `make_config("topk", {"k": 8})`: a validated config."""
    return get(name).config_cls.from_dict({**(values or {}), **fields})


def config_from_dict(values: Mapping[str, Any]) -> MethodConfig:
    """A config from a dict with a `method` key, as sweeps write them."""
    if "method" not in values:
        raise ConfigError(f"attn.method: missing; allowed: {', '.join(methods())}")
    return make_config(values["method"], {k: v for k, v in values.items() if k != "method"})


def build(cfg: MethodConfig, dim: int) -> nn.Module:
    """The token mixer for `cfg` at model width `dim`: (B, T, dim) -> (B, T, dim)."""
    spec = get(cfg.method)
    if not isinstance(cfg, spec.config_cls):
        raise ConfigError(f"{cfg.method}: expected a {spec.config_cls.__name__}, got {type(cfg).__name__}")
    if cfg.causal and not spec.capabilities.causal:
        raise ConfigError(f"{cfg.method}.causal: this method has no causal form; "
                          f"causal methods: {', '.join(m for m in methods() if get(m).capabilities.causal)}")
    return spec.factory(cfg, dim)


def build_feedforward(cfg: MethodConfig, dim: int) -> nn.Module | None:
    """The method's own feed-forward for a transformer block, or None for the dense default."""
    spec = get(cfg.method)
    return spec.feedforward(cfg, dim) if spec.feedforward else None
