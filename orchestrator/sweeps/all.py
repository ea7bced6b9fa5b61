"""Every registered attention method at its defaults on one workload (the lm by default): the overview."""

from ray import tune

import attention
from orchestrator.spec import SweepSpec
from orchestrator.sweeps.colt5 import SMOKE_COLT5

# --smoke runs 32-token sequences: the methods whose defaults assume longer ones get smaller knobs there.
SMOKE_KNOBS = {"colt5": SMOKE_COLT5, "coor_descent": {"sparsity_k": 4, "n_iters": 10}, "topk": {"k": 4},
               "local": {"window_size": 8}, "sea": {"k": 4, "predictor_length": 16}}

SWEEP = SweepSpec(
    name="all",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search([{"method": m} for m in attention.methods()])},
    smoke_space={"attn": tune.grid_search([{**SMOKE_KNOBS.get(m, {}), "method": m} for m in attention.methods()])},
)
