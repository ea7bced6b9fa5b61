"""The sweep's comparison report against a real sqlite MLflow store holding fabricated sweeps whose
answers are known: the common step under ASHA and divergence, mean ± std and n per config, Δ and its
Welch interval, verdicts, floors, CPU memory and shared devices, the Pareto frontier, what --log writes
and that reading writes nothing."""

import json
import math
import sys

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from orchestrator import compare as cmp
from orchestrator import report, tracking

COLT5 = "colt5 window_routed_q=8 num_routed_kv=32"
BIGRAM = {"name": "bigram", "value": 3.58, "margin": 0.1, "unit": "bpc"}
UNIGRAM = {"name": "unigram", "value": 4.50, "margin": 0.0, "unit": "bpc"}


def trial(config, seed, curve, status="FINISHED", group="all", tps=1000.0, peak=None, **tags):
    return {"config": config, "seed": seed, "curve": curve, "status": status, "group": group, "tps": tps,
            "peak": peak, "tags": tags}


def write_sweep(client, name, trials, artifact_root, metric="val/bpc", **parent_tags) -> str:
    """A parent run and a child run per trial, in the shape the sweep writes them (the data contract)."""
    exp = tracking.ensure_experiment(client, name, artifact_root)
    tags = {"quality_metric": metric, "quality_mode": "min", "workload": "lm", "baseline": "softmax",
            "scheduler": "fifo", "device": "cuda", "shared_device": "false", **parent_tags}
    parent = tracking.create_parent_run(client, exp, name, f"{name}-1", tags)
    for i, t in enumerate(trials):
        run = client.create_run(exp, run_name=f"{t['config']} s{t['seed']}", tags={
            "mlflow.parentRunId": parent, "trial_id": f"t{i}", "method": t["config"].split()[0], "workload": "lm",
            "config": t["config"], "seed": str(t["seed"]), "group": t["group"], **t["tags"]})
        rid = run.info.run_id
        metrics = [Metric(metric, v, 0, s) for s, v in t["curve"].items()]
        last = max(t["curve"])
        metrics += [Metric("val/loss", v * math.log(2), 0, s) for s, v in t["curve"].items()]
        metrics += [Metric("perf/tokens_per_s", t["tps"], 0, last), Metric("params/trainable", 120_000, 0, 0),
                    Metric("params/total", 130_000, 0, 0)]
        if t["peak"] is not None:
            metrics.append(Metric("perf/peak_mem_mib", t["peak"], 0, last))
        client.log_batch(rid, metrics=metrics)
        client.set_terminated(rid, status=t["status"])
    return parent


def curve(at200, at400=None, start=3.9, steps=(100, 200, 300, 400)):
    """A learning curve with the given values at steps 200 and 400 (and the last step given)."""
    at400 = at200 - 0.2 if at400 is None else at400
    points = {100: start, 200: at200, 300: (at200 + at400) / 2, 400: at400}
    return {s: points[s] for s in steps}


def asha_trials():
    """softmax: 3 seeds; colt5: 3 seeds, one stopped by ASHA at 200; topk: 3 seeds, one diverged at 150
    after one evaluation (counted, it would drag the common step to 100 and its mean to 3.9)."""
    return [
        *[trial("softmax", s, curve(v), tps=1000 + 10 * s, peak=900.0) for s, v in enumerate([2.50, 2.52, 2.54])],
        trial(COLT5, 0, curve(2.40), tps=1500.0, peak=1200.0),
        trial(COLT5, 1, curve(2.41), tps=1500.0, peak=1200.0),
        trial(COLT5, 2, curve(2.45, steps=(100, 200)), tps=1500.0, peak=1200.0, stopped_early="true",
              stopped_at_step="200"),
        trial("topk k=8", 0, curve(2.49), tps=1200.0, peak=950.0),
        trial("topk k=8", 1, {100: 3.9}, "FAILED", tps=1200.0, peak=950.0, diverged="true", diverged_at_step="150"),
        trial("topk k=8", 2, curve(2.57), tps=1200.0, peak=950.0),
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    tracking.create_sqlite_store(uri)
    client = MlflowClient(uri)
    artifacts = (root / "artifacts").as_uri()
    parents = {
        "asha": write_sweep(client, "asha", asha_trials(), artifacts, scheduler="asha",
                            floors=json.dumps([BIGRAM, UNIGRAM])),
        # the baseline sits on the bigram floor; CPU (no peak memory), trials packed on one device
        "untrained": write_sweep(client, "untrained", [
            *[trial("softmax", s, curve(v, v, steps=(100, 200))) for s, v in enumerate([3.56, 3.58])],
            *[trial("linear feature_map=elu", s, curve(v, v, steps=(100, 200))) for s, v in enumerate([3.60, 3.63])],
        ], artifacts, device="cpu", shared_device="true", floors=json.dumps([BIGRAM])),
        # accuracy (higher is better), two comparison groups with their own baseline rows
        "lora": write_sweep(client, "lora", [
            trial(cfg, s, {100: 0.5, 200: base + off + 0.01 * s}, group=g, tps=tps, peak=mem)
            for g, base in (("quantized", 0.90), ("inverted", 0.60))
            for cfg, off, tps, mem in (("full", 0.0, 800.0, 700.0), ("lora rank=4", -0.10, 1100.0, 300.0),
                                       ("lora rank=16", 0.05, 1000.0, 350.0))
            for s in range(2)
        ], artifacts, metric="val/acc", quality_mode="max", baseline="full", workload="lora",
            floors=json.dumps([{"name": "majority", "value": 0.1135, "margin": 0.02, "unit": "acc"}])),
    }
    return client, uri, parents, root


def rows_by_config(client, parent, capsys=None):
    trials = report.report(client, parent, log=False)
    out = capsys.readouterr().out if capsys else ""
    sweep = report.read_sweep(client.get_run(parent))
    comparison = cmp.compare(report.read_trials(client, parent, sweep.metric, sweep.device), sweep.metric,
                             sweep.mode, sweep.baseline, sweep.floors)
    return comparison, {(r.group, r.config): r for g in comparison.groups for r in g.rows}, trials, out


def test_asha_sweep_is_compared_at_the_common_step_without_the_diverged_trial(store, capsys):
    client, _, parents, _ = store
    comparison, rows, trials, out = rows_by_config(client, parents["asha"], capsys)
    (group,) = comparison.groups
    assert group.common_step == 200  # colt5 s2 stopped there; the diverged topk s1 (last eval 100) does not count
    soft, colt5, topk = rows["all", "softmax"], rows["all", COLT5], rows["all", "topk k=8"]
    assert soft.is_baseline and [r.config for r in group.rows] == ["softmax", COLT5, "topk k=8"]
    assert (soft.quality.n, colt5.quality.n, topk.quality.n) == (3, 3, 2)
    assert soft.quality.mean == pytest.approx(2.52) and soft.quality.std == pytest.approx(0.02)
    assert colt5.quality.mean == pytest.approx(np.mean([2.40, 2.41, 2.45]))
    assert colt5.quality.std == pytest.approx(np.std([2.40, 2.41, 2.45], ddof=1))
    assert topk.quality.mean == pytest.approx(2.53)  # 2.49 and 2.57: the diverged 3.9 left out
    # finals beside: colt5's stopped seed ends at 200, the others at 400
    assert colt5.final_steps == (200, 400) and colt5.final.mean == pytest.approx(np.mean([2.20, 2.21, 2.45]))
    assert soft.final_steps == (400, 400) and soft.final.mean == pytest.approx(2.32)
    assert topk.status == "2 finished, s1 diverged @ 150 (excluded)"
    assert colt5.status == "2 finished, 1 stopped (ASHA) @ 200"
    # the per-trial rows: every trial, read at the common step, with its own final step
    by_run = {t["run"]: t for t in trials}
    assert len(trials) == 9 and by_run[f"{COLT5} s0"]["quality_at_common"] == pytest.approx(2.40)
    assert by_run[f"{COLT5} s0"]["final_step"] == 400 and by_run[f"{COLT5} s2"]["final_step"] == 200
    assert by_run["topk k=8 s1"]["in_stats"] is False and by_run["topk k=8 s1"]["quality_at_common"] is None
    assert "val/bpc @ 200" in out and "2.420 ± 0.026" in out and "ASHA stopped some earlier" in out


def test_delta_and_welch_interval_match_a_hand_computation(store):
    client, _, parents, _ = store
    _, rows, _, _ = rows_by_config(client, parents["asha"])
    # Welch by hand (numpy), t quantile from scipy.stats.t.ppf(0.975, dof) computed apart from the code
    a, b = np.array([2.40, 2.41, 2.45]), np.array([2.50, 2.52, 2.54])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert dof == pytest.approx(3.723076923076917)
    half = 2.859817048025412 * math.sqrt(va + vb)
    d = rows["all", COLT5].delta
    assert d.value == pytest.approx(-0.10) and d.dof == pytest.approx(dof)
    assert (d.low, d.high) == (pytest.approx(-0.1547613273000646), pytest.approx(-0.0452386726999347))
    assert (d.low, d.high) == (pytest.approx(-0.10 - half), pytest.approx(-0.10 + half))
    assert d.verdict == "better"
    # topk's seeds (2.49, 2.57) straddle the baseline's: Δ +0.01 in [-0.368, +0.388]
    d = rows["all", "topk k=8"].delta
    assert (d.value, d.low, d.high) == (pytest.approx(0.01), pytest.approx(-0.3681461279491648),
                                        pytest.approx(0.38814612794916525))
    assert d.verdict == "within noise"
    assert rows["all", "softmax"].delta.verdict == "baseline"


def test_verdicts_read_the_direction_and_need_two_seeds():
    two = cmp.Stat.of([0.80, 0.81])
    assert cmp.delta(two, cmp.Stat.of([0.70, 0.71]), "max").verdict == "better"
    assert cmp.delta(two, cmp.Stat.of([0.70, 0.71]), "min").verdict == "worse"
    one = cmp.delta(cmp.Stat.of([0.8]), two, "max")
    assert one.verdict == "n < 2" and one.low is None and one.value == pytest.approx(-0.005)
    assert cmp.Stat.of([0.8]).std is None


def test_t_quantile_without_scipy_uses_its_table(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` now raises ImportError
    # scipy.stats.t.ppf(0.975, dof) for dof 1.1695..., 3.7230..., 17, 45
    for dof, want in ((1.1695501730103828, 9.082776200556346), (3.723076923076917, 2.859817048025412),
                      (17, 2.1098155778331806), (45, 2.0141033848332923)):
        assert cmp.t_quantile(0.975, dof) == pytest.approx(want, rel=5e-3)


def test_floors_stated_and_the_cleared_baseline_is_not_called_untrained(store, capsys):
    client, _, parents, _ = store
    _, rows, trials, out = rows_by_config(client, parents["asha"], capsys)
    assert "untrained" not in out
    assert "The baseline softmax stands at 2.520 ± 0.020 bpc at step 200, below the bigram floor 3.58 - 0.1" in out
    assert "bigram 3.58 bpc (margin 0.1), unigram 4.5 bpc" in out
    # vs floor: final value - floor (min mode), negative = beaten
    assert rows["all", "softmax"].vs_floor.mean == pytest.approx(2.32 - 3.58)
    assert next(t for t in trials if t["run"] == "softmax s0")["vs_unigram"] == pytest.approx(2.30 - 4.50)
    assert "−1.260 cleared" in out


def test_a_baseline_on_the_floor_makes_the_report_say_untrained(store, capsys):
    client, _, parents, _ = store
    _, rows, _, out = rows_by_config(client, parents["untrained"], capsys)
    assert ("The baseline softmax stands at 3.570 ± 0.014 bpc at step 200, not below the bigram floor 3.58 - 0.1: "
            "this sweep compares untrained models.") in " ".join(out.split())
    assert rows["all", "linear feature_map=elu"].vs_floor.mean == pytest.approx(0.035)
    assert "+0.035 not past" in out and "Not past the bigram floor by its margin at the end: linear" in out


def test_cpu_memory_is_na_and_shared_devices_are_marked(store, capsys):
    client, _, parents, _ = store
    comparison, rows, _, out = rows_by_config(client, parents["untrained"], capsys)
    assert not comparison.memory_measured and "n/a (CPU)" in out
    assert "tokens/s †" in out
    assert "tokens/s of trials that shared a device are not comparable with each other's absolute values" in out
    assert "Peak memory is n/a: the trials ran on the CPU" in out
    assert not any(r.pareto_memory for r in rows.values())
    _, _, _, out = rows_by_config(client, parents["asha"], capsys)
    assert "shared a device" not in out and "n/a" not in out and "1,200 ± —" not in out


def test_pareto_frontier(store):
    client, _, parents, _ = store
    _, rows, _, _ = rows_by_config(client, parents["asha"])
    # colt5 is better and faster than both: the speed frontier is colt5 alone; on memory softmax (900 MiB)
    # holds against colt5 (1200 MiB, better) while topk (950 MiB, worse) is dominated by softmax
    assert {c for (_, c), r in rows.items() if r.pareto_speed} == {COLT5}
    assert {c for (_, c), r in rows.items() if r.pareto_memory} == {COLT5, "softmax"}
    front = cmp.pareto_front({"a": (0.9, 100), "b": (0.8, 200), "c": (0.8, 150), "d": (0.9, 100)}, "max", True)
    assert front == {"a", "d", "b"}  # ties dominate nobody; c is b with less throughput


def test_groups_get_their_own_common_step_and_baseline(store, capsys):
    client, _, parents, _ = store
    comparison, rows, _, out = rows_by_config(client, parents["lora"], capsys)
    assert [g.name for g in comparison.groups] == ["inverted", "quantized"]
    for g in ("inverted", "quantized"):
        assert rows[g, "full"].is_baseline and rows[g, "full"].quality.n == 2
        assert rows[g, "lora rank=16"].delta.value == pytest.approx(0.05)  # against its own group's full
        assert rows[g, "lora rank=16"].delta.verdict == "better"  # accuracy: higher is better
        assert rows[g, "lora rank=4"].delta.verdict == "worse"
    assert rows["inverted", "lora rank=4"].quality.mean == pytest.approx(0.505)
    assert "group inverted" in out and "group quantized" in out and "val/acc @ 200" in out


def _store_state(client, root, parent):
    run = client.get_run(parent)
    children = tracking.child_runs(client, parent)
    files = sorted(str(p.relative_to(root)) for p in (root / "artifacts").rglob("*") if p.is_file()) \
        if (root / "artifacts").exists() else []
    return (dict(run.data.tags), sorted((c.info.run_id, tuple(sorted(c.data.tags.items()))) for c in children),
            [a.path for a in client.list_artifacts(parent)], files)


def test_reading_writes_nothing_and_log_sets_the_description(store, tmp_path, capsys):
    client, uri, parents, root = store
    parent = parents["untrained"]
    before = _store_state(client, root, parent)
    assert report.main(["untrained", "--tracking-uri", uri]) == 0
    assert "this sweep compares untrained models" in " ".join(capsys.readouterr().out.split())
    assert _store_state(client, root, parent) == before
    assert report.DESCRIPTION_TAG not in before[0] and before[2] == []

    assert report.main(["untrained", "--tracking-uri", uri, "--sweep-id", "untrained-1", "--log"]) == 0
    tags = client.get_run(parent).data.tags
    assert tags[report.DESCRIPTION_TAG].startswith("## sweep untrained")
    assert "| softmax (baseline) | 2 | 3.570 ± 0.014 |" in tags[report.DESCRIPTION_TAG]
    assert "this sweep compares untrained models" in tags[report.DESCRIPTION_TAG]
    logged = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert logged == {f"comparison/comparison{s}" for s in (".csv", "_configs.csv", ".md", ".png")}


def test_unknown_sweep_and_store_are_errors_not_tracebacks(store, tmp_path, capsys):
    _, uri, _, _ = store
    assert report.main(["nope", "--tracking-uri", uri]) == 2
    assert report.main(["asha", "--tracking-uri", uri, "--sweep-id", "asha-9"]) == 2
    assert report.main(["asha", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    err = capsys.readouterr().err
    assert "no sweep 'nope'" in err and "with sweep id 'asha-9'" in err and "no MLflow store" in err
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("sweep", ["asha", "lora", "untrained"])
def test_the_figure_and_tables_are_written(store, tmp_path, sweep, capsys):
    client, _, parents, _ = store
    report.report(client, parents[sweep], log=False, out_dir=tmp_path)
    png = tmp_path / "comparison.png"
    assert png.stat().st_size > 10_000
    configs = (tmp_path / "comparison_configs.csv").read_text().splitlines()
    trials = (tmp_path / "comparison.csv").read_text().splitlines()
    assert len(trials) - 1 == len(client.search_runs([client.get_run(parents[sweep]).info.experiment_id])) - 1
    assert configs[0].startswith("group,config,baseline,n,common_step,mean,std")


def test_runs_without_config_tags_are_labelled_by_method_and_varied_knobs(store, capsys):
    """Sweeps from before the `config`/`group`/`seed` tags: one group, labels from the params that vary."""
    client, _, _, root = store
    exp = tracking.ensure_experiment(client, "legacy", (root / "artifacts").as_uri())
    parent = tracking.create_parent_run(client, exp, "legacy", "legacy-1", {"quality_metric": "val/bpc"})
    for i, (method, k) in enumerate([("softmax", None), ("topk", "4"), ("topk", "8")]):
        run_id, _ = tracking.get_or_create_child_run(
            client, parent, f"t{i}", {"attn": {"method": method, **({"k": k} if k else {}), "heads": 2}}, 0)
        tracking.log_metrics(client, run_id, {"val/bpc": 3.0 - i / 10}, step=10)
        client.set_terminated(run_id)
    _, rows, _, out = rows_by_config(client, parent, capsys)
    assert set(rows) == {("all", "softmax"), ("all", "topk k=4"), ("all", "topk k=8")}
    assert all(r.quality.n == 1 and r.delta is None for r in rows.values())
    assert "No trivial floor was recorded" in out and "Δ vs" not in out
