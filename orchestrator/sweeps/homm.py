"""High-order moment models: moment order and expansion against softmax."""

from ray import tune

from orchestrator.spec import SweepSpec, grid

SWEEP = SweepSpec(
    name="homm",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search([{"method": "softmax"}, *grid("homm", order=[1, 2, 3], order_expand=[1, 2])])},
    smoke_space={"attn": tune.grid_search([{"method": "softmax"}, *grid("homm", order=[2], order_expand=[1])])},
)
