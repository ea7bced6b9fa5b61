"""Base class and validation helpers for method configs.

Every method has a frozen dataclass config. It validates on construction, so a bad knob fails with
a message naming the field, the value given and what is allowed, before any GPU time is spent.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config field has a value that is not allowed. The message names field, value and rule."""


def closest(names: Iterable[str], allowed: Iterable[str]) -> str:
    """' (did you mean 'lr'?)' for the first of `names` that is a likely typo of an allowed name, else ''."""
    import difflib

    allowed = list(allowed)
    for name in names:
        match = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
        if match:
            return f" (did you mean {match[0]!r}?)"
    return ""


def unknown_names(where: str, unknown: Iterable[str], allowed: Iterable[str]) -> ConfigError:
    """The error for names that are not allowed: which, the closest allowed one, and the allowed list."""
    unknown, allowed = sorted(unknown), list(allowed)
    return ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}{closest(unknown, allowed)}; "
                       f"allowed: {', '.join(allowed)}")


# Inside a sweep's validation a knob that cannot change the computation at the workload's sizes (k >= the
# keys there are, every token routed) is an error: the ablation would compare identical models. The
# library itself allows such values (k = T is plain softmax, useful to test against it).
_REJECT_INERT_KNOBS = contextvars.ContextVar("reject_inert_knobs", default=False)


@contextlib.contextmanager
def rejecting_inert_knobs() -> Iterator[None]:
    token = _REJECT_INERT_KNOBS.set(True)
    try:
        yield
    finally:
        _REJECT_INERT_KNOBS.reset(token)


def check_acts(cfg: Any, name: str, acts: bool, why: str) -> None:
    """`why`: what the value does at these sizes, e.g. 'k=128 selects every key of 128-token sequences'."""
    if not acts and _REJECT_INERT_KNOBS.get():
        raise ConfigError(f"{_where(cfg, name)}: {why}, so the knob does not act; a sweep compares knobs "
                          f"that change the computation: choose a smaller value or longer sequences")


def _where(cfg: Any, name: str) -> str:
    method = getattr(cfg, "method", None) or type(cfg).__name__
    return f"{method}.{name}"


def check_int(cfg: Any, name: str, *, min: int | None = None, max: int | None = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_where(cfg, name)}: expected an integer, got {value!r}")
    if min is not None and value < min:
        raise ConfigError(f"{_where(cfg, name)}: must be >= {min}, got {value}")
    if max is not None and value > max:
        raise ConfigError(f"{_where(cfg, name)}: must be <= {max}, got {value}")


def check_float(cfg: Any, name: str, *, min: float | None = None, max: float | None = None,
                min_exclusive: bool = False) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{_where(cfg, name)}: expected a number, got {value!r}")
    if min is not None and (value <= min if min_exclusive else value < min):
        op = ">" if min_exclusive else ">="
        raise ConfigError(f"{_where(cfg, name)}: must be {op} {min}, got {value}")
    if max is not None and value > max:
        raise ConfigError(f"{_where(cfg, name)}: must be <= {max}, got {value}")


def check_choice(cfg: Any, name: str, allowed: Iterable[Any]) -> None:
    value = getattr(cfg, name)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{_where(cfg, name)}: got {value!r}, allowed: {', '.join(map(repr, allowed))}")


def check_bool(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(cfg, name)}: expected true or false, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Fields every token mixer shares. Subclasses add their knobs and extend `validate`.

    heads: attention heads; dim_head: width per head (0 means dim // heads);
    causal: position t sees only positions <= t; dropout: on attention outputs.
    """

    method: ClassVar[str] = ""

    heads: int = 4
    dim_head: int = 0
    causal: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_int(self, "heads", min=1)
        check_int(self, "dim_head", min=0)
        check_bool(self, "causal")
        check_float(self, "dropout", min=0.0, max=1.0)

    def check_seq_len(self, seq_len: int) -> None:
        """Checks that need the sequence length (e.g. k <= T). Called by models before training."""

    def inner_dim(self, dim: int) -> tuple[int, int]:
        """(heads, dim_head) for a model of width `dim`."""
        dim_head = self.dim_head or dim // self.heads
        if dim_head < 1:
            raise ConfigError(f"{_where(self, 'heads')}: {self.heads} heads do not fit model width {dim}")
        return self.heads, dim_head

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build from a plain dict (a sweep's config); unknown fields fail with the allowed names."""
        values = {k: v for k, v in values.items() if k != "method"}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise unknown_names(cls.method, unknown, names)
        return cls(**values)
