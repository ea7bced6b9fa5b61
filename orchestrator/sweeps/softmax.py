from ray import tune

from orchestrator.spec import SweepSpec, grid

SWEEP = SweepSpec(
    name="softmax",
    description="the softmax baseline: heads and model width",
    workload="lm",
    space={"attn": tune.grid_search(grid("softmax", heads=[2, 4])),
           "model": {"dim": tune.grid_search([64, 128])}},
    smoke_space={"attn": tune.grid_search(grid("softmax", heads=[1, 2]))},
)
