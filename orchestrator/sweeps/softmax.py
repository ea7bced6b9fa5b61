"""The softmax baseline: heads and model width."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

SWEEP = SweepSpec(
    name="softmax",
    description=__doc__,
    workload="lm",
    baseline={"attn": {"method": "softmax", "heads": 4}, "model": {"dim": 128}},
    smoke=Profile(seeds=(0,), shows="tests the machinery",
                  space={"attn": tune.grid_search(grid("softmax", heads=[1, 2]))}),
    cpu=Profile(base=LM_CPU, seeds=(0, 1), shows=CPU_SHOWS,
                space={"attn": tune.grid_search(grid("softmax", heads=[2, 4])),
                       "model": {"dim": tune.grid_search([64, 128])}}),
    gpu=Profile(base=LM_GPU, seeds=(0, 1, 2), shows=GPU_SHOWS,
                space={"attn": tune.grid_search(grid("softmax", heads=[4, 8])),
                       "model": {"dim": tune.grid_search([256, 384])}}),
)
