"""Coordinate-descent attention: sparsity k, iterations and the epsilon schedule, against explicit top-k
at the same k and the softmax baseline."""

from ray import tune

from orchestrator.spec import SweepSpec, grid

SWEEP = SweepSpec(
    name="coor_descent",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search([
        {"method": "softmax"},
        *grid("topk", k=[8, 32]),
        *grid("coor_descent", sparsity_k=[8, 32], n_iters=[20, 50]),
        *grid("coor_descent", sparsity_k=[32], n_iters=[50], eps=[0.03], eps_decay=[0.7]),
    ])},
    smoke_space={"attn": tune.grid_search([{"method": "softmax"}, *grid("topk", k=[4]),
                                           *grid("coor_descent", sparsity_k=[4], n_iters=[10])])},
)
