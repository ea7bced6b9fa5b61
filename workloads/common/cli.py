"""The command line every workload shares: `python -m workloads.<name> [--smoke] [--method M]
[--SECTION key=value ...] [--seed N] [--run-dir D]`; `--help` lists every knob with its default."""

from __future__ import annotations

import argparse
import json
from typing import Any

from attention.config import ConfigError
from workloads.common.report import LocalReporter
from workloads.contract import TrainingDiverged, Workload, merge


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: a string knob such as feature_map=performer


def _pairs(items: list[str], section: str) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --{section}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = _value(value)
    return out


def parser_for(workload: Workload) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m workloads.{workload.name}", description=workload.summary,
                                     epilog=workload.knob_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds")
    parser.add_argument("--method", help="attention method (attention.methods()); starts from its own defaults")
    for section in workload.sections:
        parser.add_argument(f"--{section}", nargs="*", default=[], metavar="KEY=VALUE",
                            help=f"fields of the {section} section (listed below)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--run-dir", help="where metrics and the last checkpoint go; resumes from it")
    return parser


def main(workload: Workload, argv: list[str] | None = None) -> dict[str, float]:
    args = parser_for(workload).parse_args(argv)
    # only the sections given: a section left out keeps the workload's defaults
    override: dict[str, Any] = {s: _pairs(getattr(args, s), s) for s in workload.sections if getattr(args, s)}
    if args.seed is not None:
        override["seed"] = args.seed
    try:
        config = workload.config(args.smoke)
        if args.method:  # a new method starts from its own defaults, not the previous method's knobs
            config["attn"] = {"method": args.method}
        config = merge(config, override)
        reporter = LocalReporter(args.run_dir)
        (reporter.run_dir / "config.json").write_text(json.dumps(config, indent=2))
        print(f"config: {json.dumps(config)}\nrun dir: {reporter.run_dir}", flush=True)
        result = workload.train(config, reporter)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None  # exit status 1, the message and no traceback
    except TrainingDiverged as e:
        raise SystemExit(f"error: {e}; the last checkpoint before it is in {reporter.run_dir}") from None
    print("final: " + json.dumps(result), flush=True)
    return result
