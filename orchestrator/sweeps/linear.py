"""Linear attention: feature map (elu+1, relu, Performer) and Performer feature count vs softmax."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

SPACE = {"attn": tune.grid_search([{"method": "softmax"}, *grid("linear", feature_map=["elu", "relu"]),
                                   *grid("linear", feature_map=["performer"], nb_features=[16, 64, 256])])}

SWEEP = SweepSpec(
    name="linear",
    description=__doc__,
    workload="lm",
    smoke=Profile(seeds=(0,), shows="tests the machinery", space={"attn": tune.grid_search(
        [{"method": "softmax"}, *grid("linear", feature_map=["elu", "performer"])])}),
    cpu=Profile(base=LM_CPU, space=SPACE, seeds=(0, 1), shows=CPU_SHOWS),
    gpu=Profile(base=LM_GPU, space=SPACE, seeds=(0, 1, 2), shows=GPU_SHOWS),
)
