"""Sliding-window attention: window size and look-back against full softmax."""

from ray import tune

from orchestrator.spec import SweepSpec, grid

SWEEP = SweepSpec(
    name="local",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search([{"method": "softmax"},
                                     *grid("local", window_size=[8, 16, 32, 64], look_backward=[1, 2])])},
    smoke_space={"attn": tune.grid_search([{"method": "softmax"}, *grid("local", window_size=[8])])},
)
