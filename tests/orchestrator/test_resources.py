import pytest

from attention.config import ConfigError
from orchestrator.resources import DRIVER_RESOURCES, plan


def test_two_cpus_one_worker_each_runs_two_at_once():
    r = plan({"CPU": 2.0}, workers=1, gpus_per_trial=0)
    assert (r.max_concurrent, r.workers, r.use_gpu) == (2, 1, False)


def test_concurrency_never_exceeds_what_workers_can_get():
    # 2 CPUs, 2 workers a trial: only one trial at a time, or the workers starve each other
    assert plan({"CPU": 2.0}, workers=2, gpus_per_trial=0).max_concurrent == 1
    # fractional GPUs pack trials on one GPU, capped by CPUs
    r = plan({"CPU": 16.0, "GPU": 1.0}, workers=1, gpus_per_trial=0.25)
    assert r.max_concurrent == 4 and r.gpus_per_worker == 0.25
    assert plan({"CPU": 3.0, "GPU": 1.0}, workers=1, gpus_per_trial=0.25).max_concurrent == 3
    assert plan({"CPU": 8.0}, workers=1, gpus_per_trial=0, max_concurrent=3).max_concurrent == 3


def test_driver_holds_no_cpu():
    assert DRIVER_RESOURCES["cpu"] == 0 and DRIVER_RESOURCES["memory"] > 0


@pytest.mark.parametrize("kwargs, field", [
    ({"workers": 3, "gpus_per_trial": 0}, "--workers-per-trial"),
    ({"workers": 1, "gpus_per_trial": 1}, "--gpus-per-trial"),
    ({"workers": 0, "gpus_per_trial": 0}, "--workers-per-trial"),
    ({"workers": 1, "gpus_per_trial": 0, "max_concurrent": 0}, "--max-concurrent"),
])
def test_impossible_requests_fail_clearly(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        plan({"CPU": 2.0}, **kwargs)


def test_a_declared_capacity_sizes_an_autoscaling_cluster():
    from orchestrator.resources import with_capacity

    # a KubeRay cluster whose GPU workers have not started yet
    cluster = with_capacity({"CPU": 2.0}, ["CPU=64", "GPU=8"])
    assert cluster == {"CPU": 64.0, "GPU": 8.0}
    assert plan(cluster, workers=1, gpus_per_trial=1).max_concurrent == 8
    assert with_capacity({"CPU": 128.0}, ["CPU=64"])["CPU"] == 128.0  # never below what is there


@pytest.mark.parametrize("item", ["TPU=4", "CPU=-1", "GPU", "CPU=many"])
def test_bad_capacity_fails_clearly(item):
    from orchestrator.resources import parse_capacity

    with pytest.raises(ConfigError, match="--capacity"):
        parse_capacity([item])
