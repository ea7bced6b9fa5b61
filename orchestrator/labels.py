"""Names a person can read: a trial is its method and the knobs the sweep varies (`colt5 wq=8 kv=32`), and
its seed (`colt5 wq=8 kv=32 s1`); the same label in the console, in MLflow's run names and in the
report's table. Constants (what every trial shares) are left out of the label."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from workloads.contract import flatten

# short names for the knobs sweeps vary most; any other knob goes by its field name
SHORT = {"window_routed_q": "wq", "num_routed_kv": "kv", "window_routed_ff": "wff", "router_iters": "iters",
         "num_kv_routing_tokens": "kvtok", "heavy_window": "hw", "light_window": "lw",
         "n_iters": "iters", "eps_decay": "decay", "window_size": "w", "look_backward": "back",
         "feature_map": "phi", "nb_features": "feat", "predictor_length": "pl", "order_expand": "expand",
         "topk_group": "group"}
IGNORED = {"seed", "workload", "attn.method"}


def swept_keys(configs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The dotted keys whose value differs between the configs that have them (the method and seed aside)."""
    values: dict[str, set] = {}
    for config in configs:
        for key, value in flatten(config).items():
            values.setdefault(key, set()).add(repr(value))
    return sorted(k for k, v in values.items() if len(v) > 1 and k not in IGNORED)


def config_label(config: Mapping[str, Any], swept: Iterable[str]) -> str:
    """`colt5 wq=8 kv=32`: the method, then every swept knob this config sets."""
    flat = flatten(config)
    method = flat.get("attn.method", "")
    parts = [f"{_short(k)}={_value(flat[k])}" for k in swept if k in flat]
    return " ".join([method, *parts]).strip()


def run_name(config: Mapping[str, Any], swept: Iterable[str]) -> str:
    return f"{config_label(config, swept)} s{config.get('seed', 0)}"


def _short(key: str) -> str:
    section, _, field = key.rpartition(".")
    name = SHORT.get(field, field)
    return name if section in ("attn", "") else f"{section}.{name}"


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
