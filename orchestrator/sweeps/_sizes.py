"""The sizes the character-LM sweeps run at, one per profile, and the CoLT5 knobs that act at each.

cpu: measured on the 2-core machine (2026-12-04, other work beside it): softmax, dim 128, depth 2,
128-token sequences, batch 16, lr 3e-3: 3.25 bpc after 500 steps (50 warmup, cosine over the 500), 3.03
after 500 of a 2000-step schedule, against the validation text's bigram entropy of 3.58 bits (the
workload's own default, lr 2e-3 with 30 warmup steps, was still at 3.57 after 400 steps; batch 8 reached
only 3.52 after 500). 600 steps take a softmax trial about a minute on one core; CoLT5's routed trials
run at a third of softmax's tokens/s there.
gpu: dim 384, depth 4, 1024-token sequences, batch 8, lr 1e-3, 3000 steps: 2.26 bpc on one H200 in
about a minute (ENVIRONMENT.md, issue 22's table, softmax); not yet re-measured for the other methods."""

LM_CPU = {"model": {"dim": 128, "depth": 2}, "data": {"seq_len": 128},
          "train": {"steps": 600, "batch_size": 16, "lr": 3e-3, "warmup": 50, "eval_every": 150, "log_every": 25}}
LM_GPU = {"model": {"dim": 384, "depth": 4}, "data": {"seq_len": 1024},
          "train": {"steps": 3000, "batch_size": 8, "lr": 1e-3, "warmup": 100, "eval_every": 250, "log_every": 50}}

CPU_SHOWS = ("600 steps of a 2-layer model on 128-token sequences: past the bigram floor, far from converged; "
             "differences between methods are small and seeds are few (2): read the intervals")
GPU_SHOWS = "3000 steps of a 4-layer, 384-wide model on 1024-token sequences, 3 seeds a config"

# CoLT5's causal routing per window of heavy_window tokens; the key/values of a window come from its
# strict past, so num_routed_kv must stay below the longest past, (T / heavy_window - 1) * heavy_window.
COLT5_SMOKE = {"method": "colt5", "heavy_window": 16, "light_window": 8, "window_routed_q": 4,
               "num_routed_kv": 8, "window_routed_ff": 4, "router_iters": 10}        # T = 32: past <= 16
COLT5_CPU = {"method": "colt5", "heavy_window": 32, "light_window": 16, "window_routed_ff": 8}   # T = 128: <= 96
COLT5_GPU = {"method": "colt5", "heavy_window": 256, "light_window": 128, "window_routed_ff": 64}  # T = 1024: <= 768
