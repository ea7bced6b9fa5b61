"""Sliding-window attention: window size and look-back against full softmax (only windows that leave
some keys out at the profile's sequence length: the others are softmax)."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

SWEEP = SweepSpec(
    name="local",
    description=__doc__,
    workload="lm",
    smoke=Profile(seeds=(0,), shows="tests the machinery",
                  space={"attn": tune.grid_search([{"method": "softmax"}, *grid("local", window_size=[8])])}),
    cpu=Profile(base=LM_CPU, seeds=(0, 1), shows=CPU_SHOWS, space={"attn": tune.grid_search(
        [{"method": "softmax"}, *grid("local", window_size=[8, 16, 32], look_backward=[1, 2])])}),
    gpu=Profile(base=LM_GPU, seeds=(0, 1, 2), shows=GPU_SHOWS, space={"attn": tune.grid_search(
        [{"method": "softmax"}, *grid("local", window_size=[32, 64, 128, 256], look_backward=[1, 2])])}),
)
