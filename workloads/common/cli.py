"""The command line every workload shares: `python -m workloads.<name> [--smoke] [--method M]
[--attn k=v ...] [--model k=v ...] [--train k=v ...] [--data k=v ...] [--seed N] [--run-dir D]`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from typing import Any

from attention.config import ConfigError
from workloads.common.report import LocalReporter

SECTIONS = ("attn", "model", "train", "data", "lora", "distill")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: a string knob such as feature_map=performer


def _pairs(items: list[str], section: str) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--{section}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = _value(value)
    return out


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge: override wins, sections merge key by key. A Tune grid ({"grid_search": [...]})
    replaces what it overrides, and a plain section merged onto a grid goes into each alternative."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if _is_grid(old) and isinstance(value, Mapping) and not _is_grid(value):
            out[key] = {"grid_search": [merge(alt, value) if isinstance(alt, Mapping) else value
                                        for alt in old["grid_search"]]}
        elif isinstance(value, Mapping) and isinstance(old, Mapping) and not _is_grid(value):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def main(name: str, defaults: Mapping[str, Any], smoke: Mapping[str, Any],
         train_fn: Callable[..., dict[str, float]], argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m workloads.{name}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds")
    parser.add_argument("--method", help="attention method (attention.methods())")
    for section in SECTIONS:
        parser.add_argument(f"--{section}", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--run-dir", help="where metrics and the last checkpoint go; resumes from it")
    args = parser.parse_args(argv)
    config = merge(defaults, smoke) if args.smoke else dict(defaults)
    # only the sections given: a workload without a `lora` section never sees an empty one
    override: dict[str, Any] = {s: _pairs(getattr(args, s), s) for s in SECTIONS if getattr(args, s)}
    if args.method:
        # a new method starts from its own defaults, not the previous method's knobs
        config["attn"] = {"method": args.method}
    if args.seed is not None:
        override["seed"] = args.seed
    config = merge(config, override)
    from workloads.common.train import TrainingDiverged  # torch: not for the orchestrator's import of merge

    reporter = LocalReporter(args.run_dir)
    (reporter.run_dir / "config.json").write_text(json.dumps(config, indent=2))
    print(f"config: {json.dumps(config)}\nrun dir: {reporter.run_dir}", flush=True)
    try:
        result = train_fn(config, reporter=reporter)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None  # exit status 1, the message and no traceback
    except TrainingDiverged as e:
        raise SystemExit(f"error: {e}; the last checkpoint before it is in {reporter.run_dir}") from None
    print("final: " + json.dumps(result), flush=True)
    return result
