"""Explicit top-k attention: how few keys per query keep the quality of softmax."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

SWEEP = SweepSpec(
    name="topk",
    description=__doc__,
    workload="lm",
    smoke=Profile(seeds=(0,), shows="tests the machinery",
                  space={"attn": tune.grid_search([{"method": "softmax"}, *grid("topk", k=[4])])}),
    cpu=Profile(base=LM_CPU, seeds=(0, 1), shows=CPU_SHOWS,
                space={"attn": tune.grid_search([{"method": "softmax"}, *grid("topk", k=[4, 8, 16, 32, 64])])}),
    gpu=Profile(base=LM_GPU, seeds=(0, 1, 2), shows=GPU_SHOWS,
                space={"attn": tune.grid_search([{"method": "softmax"}, *grid("topk", k=[8, 32, 128, 512])])}),
)
