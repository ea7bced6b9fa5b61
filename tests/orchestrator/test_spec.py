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


def test_every_named_sweep_validates_full_and_smoke():
    names = sweep_names()
    assert "colt5" in names
    for name in names:
        spec = load_sweep(name)
        for smoke in (False, True):
            assert validate(param_space(spec, smoke)) >= 1, name


def test_optuna_gets_choices_instead_of_grids():
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical

    from orchestrator.spec import grid_to_choice

    space = grid_to_choice(param_space(load_sweep("topk"), smoke=False))
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
            "n = validate(param_space(load_sweep('softmax'), False)); "
            "print(n, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    count, dynamo = out.stdout.split()
    assert int(count) >= 1 and dynamo == "False", out.stdout + out.stderr
