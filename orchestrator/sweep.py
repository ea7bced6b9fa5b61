"""`python -m orchestrator.sweep NAME`: run a named ablation sweep.

Embedded by default (a local Ray started here, MLflow in ./runs/mlflow.db, Ray storage in ./runs/ray);
against a cluster with --address or inside `ray job submit` (RAY_ADDRESS is set there)."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator import bytecode

if __name__ == "__main__":  # the CLI: before torch, MLflow and Ray are imported (see bytecode.py)
    bytecode.cache_where_missing()

from attention.config import ConfigError  # noqa: E402  (light: torch loads in run(), beside Ray's start)
from orchestrator import tracking  # noqa: E402  (light: MLflow loads in run(), beside Ray's start)
from orchestrator.spec import (  # noqa: E402
    build_models,
    check_configs,
    check_sweep_name,
    expand,
    grid_to_choice,
    load_sweep,
    param_space,
    sweep_names,
    workload_module,
)

SEARCHES = ("grid", "random", "optuna")
EXECUTORS = ("auto", "inline", "train")
FORWARDED_ENV = ("ATTNLAB_", "MLFLOW_", "HF_")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("name", help=f"the sweep: {', '.join(sweep_names())}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: CPU, a minute or two")
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
                   help="MLflow tracking URI (default: sqlite file under ./runs)")
    p.add_argument("--storage", default=os.environ.get("ATTNLAB_STORAGE"),
                   help="Ray storage for checkpoints and Tune state (default: ./runs/ray)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_ID",
                   help="continue an interrupted sweep (default: the latest of this name)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value for every trial, e.g. train.steps=100")
    p.add_argument("--max-failures", type=int, default=2, help="worker retries per trial")
    p.add_argument("--capacity", nargs="*", default=[], metavar="RESOURCE=N",
                   help="what an autoscaling cluster grows to, e.g. CPU=64 GPU=8: concurrency is sized for it "
                        "instead of for the nodes up when the sweep starts")
    return p.parse_args(argv)


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set: expected SECTION.KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parsed
    return out


def parse_capacity(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in ("CPU", "GPU") or out[name] < 0:
            raise ConfigError(f"--capacity: expected CPU=N or GPU=N with N >= 0, got {item!r}")
    return out


def with_capacity(cluster: dict[str, float], items: list[str]) -> dict[str, float]:
    """The cluster's resources now, or what it is declared to grow to, whichever is larger."""
    declared = parse_capacity(items)
    return {**cluster, **{k: max(cluster.get(k, 0.0), v) for k, v in declared.items()}}


def check_args(args: argparse.Namespace) -> None:
    """The arguments that need no sweep loaded: checked before Ray starts."""
    if args.search not in SEARCHES:
        raise ConfigError(f"--search: got {args.search!r}, allowed: {', '.join(SEARCHES)}")
    if args.executor not in EXECUTORS:
        raise ConfigError(f"--executor: got {args.executor!r}, allowed: {', '.join(EXECUTORS)}")
    if args.executor == "inline" and args.workers_per_trial > 1:
        raise ConfigError(f"--executor: inline runs one worker a trial, got --workers-per-trial "
                          f"{args.workers_per_trial}; use train (or auto)")
    parse_capacity(args.capacity)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    check_sweep_name(args.name)


def prepare(args: argparse.Namespace) -> tuple[Any, dict[str, Any], int, list]:
    """What can fail on bad input before any trial: arguments, sweep, workload, every knob (the models
    are built on the meta device by run())."""
    check_args(args)
    spec = load_sweep(args.name)
    space = param_space(spec, args.smoke, args.workload, _overrides(args.set))
    n, tasks = check_configs(space)
    return spec, space, n, tasks


def _start_ray(address: str | None) -> None:
    import ray

    if address:
        # a running cluster: its workers do not see this shell's environment, so pass on attnlab's and
        # MLflow's settings (inside `ray job submit` the job's runtime_env already carries them)
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": forwarded} if forwarded else None)
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)
        return
    # Local: no token auth (nothing else reaches this Ray), and the dashboard on: without it, a
    # second trial's workers were seen never to start (ENVIRONMENT.md).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    _forget_dead_local_cluster()
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             configure_logging=True, logging_level="WARNING")


def _forget_dead_local_cluster() -> None:
    """Ray records the last local cluster in its temp dir; ray.init() attaches to it, and so do Ray's
    state API calls inside trials. A cluster that died without `ray stop` leaves the record behind and
    both hang on it: drop a record whose address answers nothing (what `ray stop` would have done)."""
    import socket

    from ray._private.utils import get_ray_address_file, read_ray_address

    recorded = read_ray_address()
    if not recorded:
        return
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return  # alive: ray.init() joins it, as Ray does by default
    except (OSError, ValueError):
        pass
    print(f"note: Ray's record of a local cluster at {recorded} is stale (nothing answers); starting a new one",
          file=sys.stderr)
    try:
        os.remove(get_ray_address_file(None))
    except OSError:
        pass


def run(args: argparse.Namespace) -> int:
    check_args(args)
    import ray
    from ray import tune  # imports all that Ray's start imports: the thread below never races it for a module

    root = Path("runs").resolve()
    storage = args.storage or str(root / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    tracking_uri = args.tracking_uri or tracking.default_tracking_uri(root)
    artifact_root = (root / "mlflow-artifacts").as_uri() if tracking_uri.startswith("sqlite:") else None

    def validate_then_open_tracking():
        # Ray takes seconds to start (7 s on the H100 machine); importing torch and MLflow, checking every
        # knob, building the models on the meta device and creating a new sqlite store (MLflow's
        # migrations) take about as long: they run beside it. Nothing is written before all of it passed.
        spec, space, n_points, tasks = prepare(args)
        build_models(tasks)
        from mlflow.tracking import MlflowClient

        if "://" not in storage:
            Path(storage).mkdir(parents=True, exist_ok=True)
        if tracking_uri.startswith("sqlite:"):
            root.mkdir(parents=True, exist_ok=True)
            tracking.create_sqlite_store(tracking_uri)
        client = MlflowClient(tracking_uri)
        return spec, space, n_points, client, tracking.ensure_experiment(client, spec.name, artifact_root)

    t_start = time.time()
    with ThreadPoolExecutor(1) as pool:
        ready = pool.submit(validate_then_open_tracking)
        ready.add_done_callback(_print_config_error)  # a bad knob is shown at once, not after Ray's start
        _start_ray(args.address)
        t_ray = time.time()
        try:
            spec, space, n_points, client, exp_id = ready.result()
        except BaseException:
            ray.shutdown()
            raise

    from orchestrator.driver import SweepContext, process_created, run_trial, run_trial_inline
    from orchestrator.report import report
    from orchestrator.resources import DRIVER_RESOURCES, plan
    from orchestrator.scheduler import TrackedASHA

    module = workload_module(space["workload"])
    metric, mode = module.QUALITY_METRIC, module.QUALITY_MODE
    steps = max(int(c.get("train", {}).get("steps", 1)) for c in expand(space))
    cluster = with_capacity(ray.cluster_resources(), args.capacity)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if cluster.get("GPU") else 0.0)
    res = plan(cluster, args.workers_per_trial, gpus, args.cpus_per_worker, args.max_concurrent)
    pointer = Path(storage) / f"{spec.name}.latest" if "://" not in storage else None
    if args.resume:
        sweep_id = args.resume
        if sweep_id == "latest":
            if pointer is None or not pointer.exists():
                raise ConfigError(f"--resume: no earlier run of sweep {spec.name!r} under {storage}")
            sweep_id = pointer.read_text().strip()
        parent_id = tracking.find_parent_run(client, exp_id, sweep_id)
        if parent_id is None:
            raise ConfigError(f"--resume: sweep id {sweep_id!r} has no parent run in {tracking_uri}")
        client.update_run(parent_id, status="RUNNING")
        # trials whose run finished before the interruption (Tune's saved state may not know it yet)
        finished = frozenset(r.data.tags.get("trial_id") for r in tracking.child_runs(client, parent_id)
                             if r.info.status == "FINISHED")
    else:
        finished = frozenset()
        sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = tracking.create_parent_run(client, exp_id, spec.name, sweep_id, {
            "git_sha": tracking.git_sha(), "ray_version": ray.__version__,
            "cluster": json.dumps({k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory")}),
            "quality_metric": metric, "quality_mode": mode, "workload": space["workload"],
            "smoke": str(args.smoke).lower()})
        tracking.log_params(client, parent_id, {"search": args.search, "num_samples": args.num_samples,
                                                "grid_points": n_points, "max_concurrent": res.max_concurrent,
                                                "workers_per_trial": res.workers,
                                                "gpus_per_worker": res.gpus_per_worker})
        if pointer is not None:
            pointer.write_text(sweep_id)
    executor = "inline" if (args.executor == "inline" or (args.executor == "auto" and res.workers == 1)) else "train"
    print(f"sweep {sweep_id}: {n_points} configs x {args.num_samples}, up to {res.max_concurrent} at once, "
          f"{res.workers} worker(s) x ({res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU), "
          f"executor {executor}", flush=True)

    ctx = SweepContext(spec.name, sweep_id, tracking_uri, parent_id, storage, res.workers,
                       res.cpus_per_worker, res.gpus_per_worker, metric, mode, args.max_failures, finished)
    inline = executor == "inline"
    if inline:  # the trial's actor trains: it holds the worker's resources itself
        resources = {"cpu": res.cpus_per_worker, **({"gpu": res.gpus_per_worker} if res.use_gpu else {})}
        trainable = tune.with_resources(tune.with_parameters(run_trial_inline, ctx=ctx), resources)
    else:  # the trial's actor only drives a TorchTrainer: it holds nothing its workers need
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), DRIVER_RESOURCES)
    experiment = f"{storage}/{sweep_id}"
    if args.resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        scheduler = TrackedASHA(tracking_uri, parent_id, time_attr="step", max_t=steps, reduction_factor=2,
                                stop_last_trials=False, grace_period=max(1, int(steps * spec.grace_fraction)))
        tuner = tune.Tuner(
            trainable, param_space=grid_to_choice(space) if args.search == "optuna" else space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        num_samples=args.num_samples,
                                        max_concurrent_trials=res.max_concurrent, reuse_actors=inline,
                                        search_alg=_search_alg(args.search, metric, mode)),
            run_config=tune.RunConfig(
                name=sweep_id, storage_path=storage, verbose=1,
                # inline trials retry from their last checkpoint here; train trials retry inside Ray Train
                failure_config=tune.FailureConfig(max_failures=args.max_failures if inline else 1),
                # every checkpoint kept: Tune's saved experiment state can name a checkpoint that a
                # num_to_keep clean-up deleted just before a crash, and then --resume cannot restore it
                checkpoint_config=tune.CheckpointConfig(checkpoint_score_attribute=metric,
                                                        checkpoint_score_order=mode)))
    t_fit = time.time()
    results = tuner.fit()
    t_trials = time.time()
    # Ray is no longer needed: it stops (1-1.5 s) while the runs are closed and the report is made
    with ThreadPoolExecutor(1) as pool:
        closing = pool.submit(lambda: (_finish_children(client, parent_id, results), report(client, parent_id)))
        ray.shutdown()
        rows = closing.result()[1]
    errors = sum(1 for r in results if r.error)
    # where the sweep's own time went (the trials' start-up is perf/startup_s on each child run)
    tracking.log_metrics(client, parent_id, {
        "perf/process_start_to_ray_s": t_ray - process_created(), "perf/ray_to_trials_s": t_fit - t_ray,
        "perf/trials_s": t_trials - t_fit, "perf/report_s": time.time() - t_trials}, 0)
    client.set_terminated(parent_id, status="FAILED" if errors == len(rows) and rows else "FINISHED")
    print(f"\n{len(rows)} trials, {errors} failed, {time.time() - t_start:.0f} s. Open the results with:\n"
          f"  mlflow ui --backend-store-uri {tracking_uri}"
          + (f" --default-artifact-root {artifact_root}" if artifact_root else ""), flush=True)
    return 1 if errors else 0


def _print_config_error(future) -> None:
    error = future.exception()
    if isinstance(error, ConfigError):
        print(f"error: {error}", file=sys.stderr, flush=True)
        error.printed = True


def _search_alg(search: str, metric: str, mode: str):
    if search != "optuna":
        return None  # Tune's default: grid_search expanded, other domains sampled at random
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=metric, mode=mode)


def _finish_children(client, parent_id: str, results) -> None:
    """Trials ASHA stopped may not finish their own run (their actor is stopped): close those runs here,
    with their last checkpoint as the artifact. (TrackedASHA already tagged them at its decision.)"""
    from orchestrator.driver import log_checkpoint

    by_trial = {r.metrics.get("trial_id"): r for r in results if r.metrics}
    for run in tracking.child_runs(client, parent_id):
        if run.info.status != "RUNNING":
            continue
        result = by_trial.get(run.data.tags.get("trial_id"))
        if result is not None and result.error is None:
            path = result.checkpoint.path if result.checkpoint else result.metrics.get("checkpoint_path")
            if path:
                log_checkpoint(client, run.info.run_id, path)
            client.set_terminated(run.info.run_id, status="FINISHED")
        else:
            client.set_terminated(run.info.run_id, status="FAILED")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        if not getattr(e, "printed", False):
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    # A normal exit then tears every module down with a last garbage collection over all that torch, Ray
    # and MLflow made: 1.5-2 s of a finished sweep on the 2-core machine, for nothing (runs closed, Ray
    # stopped). Run what exit runs first (the atexit handlers: Ray, logging, Tune's TensorBoard writers,
    # file locks, temp dirs), flush, and leave without the teardown. (gc.freeze() would skip the collection
    # too, but then Triton's bindings report their types as leaked.)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
