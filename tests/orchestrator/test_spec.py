import pytest
from ray import tune

from orchestrator.spec import expand, grid, load_sweep, merge_space, param_space, sweep_names, validate


def test_grid_is_the_cartesian_product():
    g = grid("topk", k=[4, 8], heads=[1, 2])
    assert len(g) == 4 and {"method": "topk", "k": 8, "heads": 1} in g


def test_merge_puts_overrides_into_every_grid_alternative():
    space = merge_space({"attn": {"method": "softmax"}}, {"attn": tune.grid_search([{"method": "a"}, {"method": "b"}])})
    assert space["attn"] == {"grid_search": [{"method": "a"}, {"method": "b"}]}
    space = merge_space(space, {"attn": {"heads": 2}})
    assert space["attn"]["grid_search"] == [{"method": "a", "heads": 2}, {"method": "b", "heads": 2}]


def test_expand_covers_grid_and_categories():
    space = {"a": tune.grid_search([1, 2]), "b": {"c": tune.choice(["x", "y"])}, "d": 5}
    configs = list(expand(space))
    assert len(configs) == 4 and {"a": 2, "b": {"c": "y"}, "d": 5} in configs


def test_every_named_sweep_validates_at_every_profile():
    names = sweep_names()
    assert "colt5" in names
    for name in names:
        spec = load_sweep(name)
        for profile in ("smoke", "cpu", "gpu"):
            assert validate(param_space(spec, profile)) >= 1, (name, profile)


def test_optuna_gets_choices_instead_of_grids():
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical

    from orchestrator.spec import grid_to_choice

    space = grid_to_choice(param_space(load_sweep("topk"), "cpu", seeds=(0,)))
    assert isinstance(space["attn"], Categorical) and len(space["attn"].categories) == 6
    searcher = OptunaSearch(space={"attn": space["attn"]}, metric="val/bpc", mode="min")
    suggestion = searcher.suggest("t1")
    assert suggestion["attn"]["method"] in ("softmax", "topk")


def test_resolved_config_fills_in_every_attention_and_training_default():
    from orchestrator.spec import resolved

    full = resolved({"workload": "lm", "attn": {"method": "topk", "k": 4}, "train": {"lr": 0.01}})
    assert full["attn"]["k"] == 4 and full["attn"]["heads"] == 4 and full["attn"]["query_chunk"] == 1024
    assert full["attn"]["method"] == "topk"
    assert full["train"]["lr"] == 0.01 and full["train"]["steps"] == 300 and full["train"]["precision"] == "auto"


def test_meta_validation_skips_random_fills_without_importing_dynamo():
    """Random init on the meta device went through torch's decompositions, whose first use imports
    torch._dynamo (seconds on a GPU machine, before Ray could start): validating the softmax sweep must
    not import it, and must still build every model."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from orchestrator.spec import load_sweep, param_space, validate; "
            "n = validate(param_space(load_sweep('softmax'), 'cpu')); "
            "print(n, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    count, dynamo = out.stdout.split()
    assert int(count) >= 1 and dynamo == "False", out.stdout + out.stderr


@pytest.mark.parametrize("method, knobs, seq_len, field", [
    ("topk", {"k": 128}, 128, "topk.k"),
    ("coor_descent", {"k": 128}, 128, "coor_descent.k"),
    ("sea", {"k": 128, "predictor_length": 64}, 128, "sea.k"),
    ("local", {"window_size": 64, "look_backward": 1}, 128, "local.window_size"),
    # kv comes from the strict past of each window: at most 64 tokens here
    ("colt5", {"heavy_window": 64, "light_window": 32, "num_routed_kv": 64, "window_routed_q": 8,
               "window_routed_ff": 8}, 128, "colt5.num_routed_kv"),
    ("colt5", {"heavy_window": 32, "light_window": 16, "num_routed_kv": 32, "window_routed_q": 32,
               "window_routed_ff": 8}, 128, "colt5.window_routed_q"),
    ("colt5", {"heavy_window": 128, "light_window": 32, "num_routed_kv": 32, "window_routed_q": 8,
               "window_routed_ff": 8}, 128, "colt5.heavy_window"),
])
def test_a_knob_that_cannot_act_fails_a_sweep_but_not_the_library(method, knobs, seq_len, field):
    import attention
    from attention.config import ConfigError, rejecting_inert_knobs

    cfg = attention.make_config(method, causal=True, **knobs)
    cfg.check_seq_len(seq_len)  # the library allows it (k = T is plain softmax: a useful check)
    with rejecting_inert_knobs(), pytest.raises(ConfigError, match=rf"{field}: .*so the knob does not act"):
        cfg.check_seq_len(seq_len)
    smaller = {k: (v // 2 if k in ("k", "num_routed_kv", "window_routed_q", "window_size") else v)
               for k, v in knobs.items()}
    if method == "colt5" and knobs["heavy_window"] == 128:
        smaller["heavy_window"] = 64
    with rejecting_inert_knobs():
        attention.make_config(method, causal=True, **smaller).check_seq_len(seq_len)  # acts: passes


def test_the_named_sweeps_dead_knobs_of_before_fail_validation():
    """The colt5 sweep routed 64 past key/values in 128-token sequences with 64-token windows: the
    whole past, selecting nothing. Its old space fails now, naming the field."""
    from ray import tune

    from attention.config import ConfigError
    from orchestrator.spec import Profile, SweepSpec

    old = {"attn": tune.grid_search([{"method": "colt5", "heavy_window": 64, "light_window": 32,
                                      "window_routed_ff": 16, "window_routed_q": 8, "num_routed_kv": 64}])}
    spec = SweepSpec("old", "", "lm", cpu=Profile(space=old, seeds=(0,)))
    with pytest.raises(ConfigError, match="colt5.num_routed_kv: num_routed_kv=64 routes the whole past"):
        validate(param_space(spec, "cpu"))
