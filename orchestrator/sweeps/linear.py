"""Linear attention: feature map (elu+1, relu, Performer) and Performer feature count vs softmax."""

from ray import tune

from orchestrator.spec import SweepSpec, grid

SWEEP = SweepSpec(
    name="linear",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search([{"method": "softmax"}, *grid("linear", feature_map=["elu", "relu"]),
                                     *grid("linear", feature_map=["performer"], nb_features=[16, 64, 256])])},
    smoke_space={"attn": tune.grid_search([{"method": "softmax"},
                                           *grid("linear", feature_map=["elu", "performer"])])},
)
