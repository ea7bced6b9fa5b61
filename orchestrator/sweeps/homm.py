"""High-order moment models: moment order and expansion against softmax."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

SPACE = {"attn": tune.grid_search([{"method": "softmax"}, *grid("homm", order=[1, 2, 3], order_expand=[1, 2])])}

SWEEP = SweepSpec(
    name="homm",
    description=__doc__,
    workload="lm",
    smoke=Profile(seeds=(0,), shows="tests the machinery", space={"attn": tune.grid_search(
        [{"method": "softmax"}, *grid("homm", order=[2], order_expand=[1])])}),
    cpu=Profile(base=LM_CPU, space=SPACE, seeds=(0, 1), shows=CPU_SHOWS),
    gpu=Profile(base=LM_GPU, space=SPACE, seeds=(0, 1, 2), shows=GPU_SHOWS),
)
