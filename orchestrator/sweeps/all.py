"""Every registered attention method on the character LM, each with knobs that act at the profile's
sequence length: the overview."""

from ray import tune

import attention
from orchestrator.spec import Profile, SweepSpec
from orchestrator.sweeps._sizes import COLT5_CPU, COLT5_GPU, COLT5_SMOKE, CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

# per method, knobs below the profile's sequence length (32 / 128 / 1024 tokens)
SMOKE_KNOBS = {"colt5": COLT5_SMOKE, "coor_descent": {"k": 4, "n_iters": 10}, "topk": {"k": 4},
               "local": {"window_size": 8}, "sea": {"k": 4, "predictor_length": 16}}
CPU_KNOBS = {"colt5": {**COLT5_CPU, "window_routed_q": 8, "num_routed_kv": 32},
             "coor_descent": {"k": 16}, "topk": {"k": 16}, "local": {"window_size": 32},
             "sea": {"k": 16, "predictor_length": 32}}
GPU_KNOBS = {"colt5": {**COLT5_GPU, "window_routed_q": 64, "num_routed_kv": 128},
             "coor_descent": {"k": 64}, "topk": {"k": 64}, "local": {"window_size": 128},
             "sea": {"k": 64, "predictor_length": 128}}


def _space(knobs: dict) -> dict:
    return {"attn": tune.grid_search([{**knobs.get(m, {}), "method": m} for m in attention.methods()])}


SWEEP = SweepSpec(
    name="all",
    description=__doc__,
    workload="lm",
    smoke=Profile(space=_space(SMOKE_KNOBS), seeds=(0,), shows="tests the machinery"),
    cpu=Profile(base=LM_CPU, space=_space(CPU_KNOBS), seeds=(0, 1), shows=CPU_SHOWS),
    gpu=Profile(base=LM_GPU, space=_space(GPU_KNOBS), seeds=(0, 1, 2), shows=GPU_SHOWS),
)
