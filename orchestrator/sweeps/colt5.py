"""CoLT5 conditional routing against the softmax baseline: routed query and key/value tokens, routing
iterations and kv routing tokens, on the character LM (causal: routed autoregressive attention and a
routed feed-forward that never looks ahead)."""

from ray import tune

from orchestrator.spec import SweepSpec, grid

# Knobs shared by every colt5 trial, sized for seq_len 128 (the lm default). The lm is causal, so routing
# is per window of heavy_window tokens: window_routed_q / window_routed_ff tokens a window, num_routed_kv
# past key/values per window.
COLT5 = {"heavy_window": 64, "light_window": 32, "window_routed_ff": 16}
SMOKE_COLT5 = {"method": "colt5", "heavy_window": 16, "light_window": 8, "window_routed_q": 4,
               "num_routed_kv": 8, "window_routed_ff": 4, "router_iters": 10}

SWEEP = SweepSpec(
    name="colt5",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search(
        [{"method": "softmax"}]
        + [{**COLT5, **a} for a in grid("colt5", window_routed_q=[8, 16], num_routed_kv=[32, 64])]
        + [{**COLT5, "method": "colt5", "window_routed_q": 16, "num_routed_kv": 64, "router_iters": 10},
           {**COLT5, "method": "colt5", "window_routed_q": 16, "num_routed_kv": 64, "num_kv_routing_tokens": 2}]
    )},
    smoke_space={"attn": tune.grid_search([{"method": "softmax"}, SMOKE_COLT5])},
)
