"""Explicit top-k attention: how few keys per query keep the quality of softmax."""

from ray import tune

from orchestrator.spec import SweepSpec, grid

SWEEP = SweepSpec(
    name="topk",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search([{"method": "softmax"}, *grid("topk", k=[4, 8, 16, 32, 64])])},
    smoke_space={"attn": tune.grid_search([{"method": "softmax"}, *grid("topk", k=[4])])},
)
