"""The sweep's command line: `python -m orchestrator.sweep NAME [options]`. Parses, checks what can be
checked without starting anything, runs the sweep (orchestrator.sweep) and turns its outcome into an
exit status: 0 done, 1 a trial failed, 2 bad input (nothing started, nothing written), 130 interrupted
(the state is saved: the printed --resume command continues it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from attention.config import ConfigError
from orchestrator.resources import parse_capacity
from orchestrator.spec import check_sweep_name, sweep_names

SEARCHES = ("grid", "random", "optuna")
EXECUTORS = ("auto", "inline", "train")
PROFILES = ("auto", "smoke", "cpu", "gpu")
SCHEDULERS = ("auto", "fifo", "asha")
# Options that define what a sweep runs: a resumed sweep takes them from its first start.
DEFINING = {"profile": "auto", "workload": None, "set": [], "search": "grid", "num_samples": 1, "seeds": None,
            "scheduler": "auto"}
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _HelpWithKnobs(argparse.Action):
    """--help: the options, then every knob of the workloads the named sweeps run on, with its default
    (built only when asked: listing them imports torch, which a sweep's start loads beside Ray's)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from orchestrator.spec import get_workload, load_sweep

        parser.print_help()
        for name in sorted({load_sweep(sweep).workload for sweep in sweep_names()}):
            print(f"\nworkload {name} (--set SECTION.FIELD=VALUE):\n{get_workload(name).knob_table()}")
        parser.exit()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("-h", "--help", action=_HelpWithKnobs, help="this help, and every knob with its default")
    p.add_argument("name", help=f"the sweep: {', '.join(sweep_names())}")
    p.add_argument("--profile", default="auto",
                   help="the sweep's sizes: smoke (tiny: tests the machinery), cpu (a few minutes of a laptop), "
                        "gpu (models that learn past the trivial floor); auto (default): gpu where trials get "
                        "GPUs, else cpu")
    p.add_argument("--smoke", action="store_true", help="the same as --profile smoke")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="seeds each config runs with, e.g. 0,1,2 (default: the profile's: 3 on a GPU)")
    p.add_argument("--scheduler", default="auto",
                   help="fifo: every trial gets the whole budget; asha: stop the worse trials early, within each "
                        "comparison group the sweep declares, never the baseline; auto (default): the sweep's "
                        "(fifo for the named sweeps)")
    p.add_argument("--workload", help="run the sweep on another workload than its default")
    p.add_argument("--search", default="grid", help=f"{', '.join(SEARCHES)} (default grid)")
    p.add_argument("--num-samples", type=int, default=1, help="repeats of the grid / samples drawn")
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs a trial gets, fractions allowed (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP) a trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--executor", default="auto",
                   help="inline: train in Tune's (reused, warm) trial actor; train: a Ray Train TorchTrainer per "
                        "trial; auto (default): inline for one worker a trial, train for several")
    p.add_argument("--address", default=None, help="a Ray cluster to join (default: start a local Ray)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: sqlite file under ./runs; ~/.attnlab/runs inside a Ray job)")
    p.add_argument("--storage", default=os.environ.get("ATTNLAB_STORAGE"),
                   help="Ray storage for checkpoints and Tune state (default: ./runs/ray)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_ID",
                   help="continue an interrupted sweep (default: the latest of this name)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override a config value for every trial, e.g. train.steps=100 or seed=1")
    p.add_argument("--max-failures", type=int, default=2, help="worker retries per trial")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Tune's trial tables and every trial's own log lines instead of one line per trial")
    p.add_argument("--capacity", nargs="*", default=[], metavar="RESOURCE=N",
                   help="what an autoscaling cluster grows to, e.g. CPU=64 GPU=8: concurrency is sized for it "
                        "instead of for the nodes up when the sweep starts")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The arguments that need no sweep loaded and nothing started."""
    if args.smoke:
        if args.profile not in ("auto", "smoke"):
            raise ConfigError(f"--smoke: the same as --profile smoke, got --profile {args.profile} too")
        args.profile, args.smoke = "smoke", False
    if args.profile not in PROFILES:
        raise ConfigError(f"--profile: got {args.profile!r}, allowed: {', '.join(PROFILES)}")
    if args.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler: got {args.scheduler!r}, allowed: {', '.join(SCHEDULERS)}")
    if isinstance(args.seeds, str):
        args.seeds = parse_seeds(args.seeds)
    if args.search not in SEARCHES:
        raise ConfigError(f"--search: got {args.search!r}, allowed: {', '.join(SEARCHES)}")
    if args.executor not in EXECUTORS:
        raise ConfigError(f"--executor: got {args.executor!r}, allowed: {', '.join(EXECUTORS)}")
    if args.workers_per_trial < 1:
        raise ConfigError(f"--workers-per-trial: must be >= 1, got {args.workers_per_trial}")
    if not args.cpus_per_worker > 0:
        raise ConfigError(f"--cpus-per-worker: must be > 0, got {args.cpus_per_worker:g}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial: must be >= 0, got {args.gpus_per_trial:g}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures: must be >= 0, got {args.max_failures}")
    if args.executor == "inline" and args.workers_per_trial > 1:
        raise ConfigError(f"--executor: inline runs one worker a trial, got --workers-per-trial "
                          f"{args.workers_per_trial}; use train (or auto)")
    parse_capacity(args.capacity)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    check_sweep_name(args.name)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: got {text!r}, allowed: distinct integers >= 0 separated by commas, e.g. 0,1,2")
    return seeds


def apply_saved(args: argparse.Namespace, saved: dict) -> argparse.Namespace:
    """A resumed sweep runs what it was started with: the defining options come from its first start,
    and one given again with another value is an error (it would silently not apply)."""
    for key, default in DEFINING.items():
        given = getattr(args, key)
        if key in saved and given != default and given != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"--resume: the sweep was started with {flag} {saved[key]!r}, got {given!r}; a "
                              f"resumed sweep runs what it started with (start a new sweep to change it)")
        setattr(args, key, saved.get(key, given))
    return args


def defining(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in DEFINING}


def resume_command(args: argparse.Namespace, sweep_id: str) -> str:
    parts = ["python -m orchestrator.sweep", args.name, "--resume", sweep_id]
    for flag, value in (("--address", args.address), ("--tracking-uri", args.tracking_uri),
                        ("--storage", args.storage)):
        if value:
            parts += [flag, value]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from orchestrator import ray_session

    if not args.verbose:
        # MLflow's store creation and migrations speak at INFO (MLflow sets its level when imported), and
        # Tune's newer console output prints its tables and hints whatever `verbose` says
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if ray_session.embedded(args.address):
        ray_session.use_loopback_only()
    from orchestrator.sweep import run

    try:
        return run(args)
    except ConfigError as e:
        if not getattr(e, "printed", False):
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted before any trial started; nothing to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
