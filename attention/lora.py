"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for any nn.Linear.

A frozen weight W0 (out, in) gets a trainable low-rank update: y = x W0^T + b + (alpha / r) x A^T B^T,
A: (r, in) Kaiming-initialised, B: (out, r) zeros, so the model is unchanged at injection.

    cfg = LoRAConfig(rank=8, alpha=16, targets=("*.to_q", "*.to_kv"))
    names = inject_lora(model, cfg)       # the replaced Linear layers
    freeze_base(model, cfg.train_also)    # only adapters (and e.g. a classifier head) train
    trainable, total = count_params(model)
    merge_lora(model)                     # fold B A alpha/r into W0 for inference; unmerge_lora undoes it

Targets match module names (as in model.named_modules()): a shell pattern (fnmatch, e.g. "*.to_q"),
or a regular expression prefixed "re:" (e.g. r"re:.*\\.(to_q|to_kv)"), matched against the whole name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from attention.config import ConfigError, check_float, check_int


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank: r of the update; alpha: the update is scaled by alpha / rank; dropout: on the adapter's input;
    targets: name patterns of the Linear layers to adapt; train_also: name patterns of modules that stay
    trainable besides the adapters (e.g. "head" for a classifier)."""

    method: ClassVar[str] = "lora"  # prefix of field names in errors and logged params (lora.rank)

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("*.to_q", "*.to_kv")
    train_also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Sweeps pass lists (JSON has no tuples); a lone string means one pattern, not its characters.
        for name in ("targets", "train_also"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        check_int(self, "rank", min=1)
        check_float(self, "alpha", min=0.0, min_exclusive=True)
        check_float(self, "dropout", min=0.0)
        if self.dropout >= 1.0:
            raise ConfigError(f"lora.dropout: must be < 1, got {self.dropout}")
        for name in ("targets", "train_also"):
            patterns = getattr(self, name)
            if not isinstance(patterns, tuple):
                raise ConfigError(f"lora.{name}: expected a list of name patterns, got {patterns!r}")
            for pattern in patterns:
                _check_pattern(name, pattern)
        if not self.targets:
            raise ConfigError("lora.targets: got (), need at least one module name pattern")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoRAConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"lora: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
        return cls(**values)


def _check_pattern(field: str, pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern or pattern == "re:":
        raise ConfigError(f"lora.{field}: each pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            raise ConfigError(f"lora.{field}: {pattern!r} is not a valid regular expression: {err}") from None


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True if module `name` matches any pattern: fnmatch, or a full regex match for "re:..." patterns."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. `base` keeps the original layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        # As nn.Linear initialises its weight (and as the paper's reference code does): A random, B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout)
        # The exact pre-merge weight while merged (restored bit for bit by unmerge); a buffer so that
        # .to() moves it, not persistent so checkpoints do not carry it.
        self.register_buffer("weight_before_merge", None, persistent=False)

    @property
    def merged(self) -> bool:
        return self.weight_before_merge is not None

    def delta_weight(self) -> torch.Tensor:
        """B A * alpha / r as (out, in), computed in float64."""
        return (self.lora_B.double() @ self.lora_A.double()) * self.scaling

    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base.weight
        self.weight_before_merge = weight.detach().clone()
        with torch.no_grad():
            weight.copy_((weight.double() + self.delta_weight()).to(weight.dtype))

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.base.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # the update is inside base.weight already
            return y
        update = (self.drop(x) @ self.lora_A.to(x.dtype).t()) @ self.lora_B.to(x.dtype).t()  # (..., out)
        return y + update * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every nn.Linear whose name matches cfg.targets by a LoRALinear (in place).

    Returns the names replaced. Linears inside existing LoRALinear layers are never wrapped again.
    Raises ConfigError naming some of the model's Linear layers when no pattern matches."""
    inside_lora = {f"{name}.base" for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    names = [name for name in _linear_names(model)
             if name not in inside_lora and name_matches(name, cfg.targets)]
    if not names:
        linears = [n for n in _linear_names(model) if n not in inside_lora]
        shown = ", ".join(linears[:12]) + (f", ... ({len(linears)} in all)" if len(linears) > 12 else "")
        raise ConfigError(f"lora.targets: {list(cfg.targets)} matched no nn.Linear in the model; its Linear "
                          f"layers are: {shown or '(none)'}")
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _is_lora_param(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf in ("lora_A", "lora_B")


def freeze_base(model: nn.Module, train_also: Iterable[str] = ()) -> None:
    """Leave only the adapters (and parameters of modules matching `train_also`) trainable."""
    train_also = tuple(train_also)
    if not lora_layers(model):
        raise ValueError("freeze_base: the model has no LoRA layers; call inject_lora first")
    extra = [name for name, _ in model.named_modules() if name and name_matches(name, train_also)]
    for pattern in train_also:
        if not any(name_matches(name, (pattern,)) for name in extra):
            modules = [n for n, _ in model.named_children()]
            raise ConfigError(f"lora.train_also: {pattern!r} matched no module; top-level modules: "
                              f"{', '.join(modules)}")
    for name, p in model.named_parameters():
        p.requires_grad_(_is_lora_param(name) or any(name.startswith(e + ".") for e in extra))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (for inference). Returns the number of layers merged."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Restore every merged base weight exactly. Returns the number of layers unmerged."""
    layers = [m for m in lora_layers(model).values() if m.merged]
    for m in layers:
        m.unmerge()
    return len(layers)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (lora_A, lora_B of every layer), detached, keyed as in model.state_dict()."""
    return {name: t.detach() for name, t in model.state_dict(keep_vars=True).items() if _is_lora_param(name)}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter weights saved by `lora_state_dict`; every adapter of the model must be present."""
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"load_lora_state_dict: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if any(m.merged for m in lora_layers(model).values()):
        raise RuntimeError("load_lora_state_dict: call unmerge_lora(model) first; merged weights hold "
                           "the old adapters")
    model.load_state_dict(dict(state), strict=False)
