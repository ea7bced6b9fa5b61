"""Coordinate-descent attention: sparsity k, iterations and the epsilon schedule, against explicit top-k
at the same k and the softmax baseline."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

SWEEP = SweepSpec(
    name="coor_descent",
    description=__doc__,
    workload="lm",
    smoke=Profile(seeds=(0,), shows="tests the machinery", space={"attn": tune.grid_search(
        [{"method": "softmax"}, *grid("topk", k=[4]), *grid("coor_descent", k=[4], n_iters=[10])])}),
    cpu=Profile(base=LM_CPU, seeds=(0, 1), shows=CPU_SHOWS, space={"attn": tune.grid_search([
        {"method": "softmax"},
        *grid("topk", k=[8, 32]),
        *grid("coor_descent", k=[8, 32], n_iters=[20, 50]),
        *grid("coor_descent", k=[32], n_iters=[50], eps=[0.03], eps_decay=[0.7]),
    ])}),
    gpu=Profile(base=LM_GPU, seeds=(0, 1, 2), shows=GPU_SHOWS, space={"attn": tune.grid_search([
        {"method": "softmax"},
        *grid("topk", k=[8, 32, 128]),
        *grid("coor_descent", k=[8, 32, 128], n_iters=[50]),
        *grid("coor_descent", k=[32], n_iters=[20]),
        *grid("coor_descent", k=[32], n_iters=[50], eps=[0.03], eps_decay=[0.7]),
    ])}),
)
