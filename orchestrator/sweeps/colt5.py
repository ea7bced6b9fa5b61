"""CoLT5 conditional routing against the softmax baseline on the character LM (causal: routed
autoregressive attention and a routed feed-forward that never looks ahead): routed query tokens per
window, routed past key/values, router iterations and kv routing tokens."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import (
    COLT5_CPU,
    COLT5_GPU,
    COLT5_SMOKE,
    CPU_SHOWS,
    GPU_SHOWS,
    LM_CPU,
    LM_GPU,
)

SWEEP = SweepSpec(
    name="colt5",
    description=__doc__,
    workload="lm",
    smoke=Profile(space={"attn": tune.grid_search([{"method": "softmax"}, COLT5_SMOKE])}, seeds=(0,),
                  shows="tests the machinery: models this small learn nothing worth comparing"),
    # a quarter of each 32-token window routed, 32 of the up to 96 past key/values: one routed config,
    # since routed trials run at a third of softmax's speed on a CPU (the README's main job: ~5 minutes)
    cpu=Profile(base=LM_CPU, seeds=(0, 1), shows=CPU_SHOWS, space={"attn": tune.grid_search(
        [{"method": "softmax"}, {**COLT5_CPU, "window_routed_q": 8, "num_routed_kv": 32}])}),
    # routed fractions <= 1/4 of a 256-token window; 64 or 128 of the up to 768 past tokens
    gpu=Profile(base=LM_GPU, seeds=(0, 1, 2), shows=GPU_SHOWS, space={"attn": tune.grid_search(
        [{"method": "softmax"}]
        + [{**COLT5_GPU, **a} for a in grid("colt5", window_routed_q=[32, 64], num_routed_kv=[64, 128])]
        + [{**COLT5_GPU, "window_routed_q": 64, "num_routed_kv": 128, "router_iters": 10}])}),
)
