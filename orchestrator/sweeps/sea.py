"""SEA (estimated sparse attention) against the softmax baseline on the character LM: keys per query k,
the compressed width (predictor_length) and the estimator's Performer features (nb_features), plus
top-k grouped across heads. Each SEA trial trains its estimator from its own attention (sampled rows,
linear in T); distillation from a trained softmax teacher is the `distill` workload."""

from ray import tune

from orchestrator.spec import SweepSpec, grid

SWEEP = SweepSpec(
    name="sea",
    description=__doc__,
    workload="lm",
    space={"attn": tune.grid_search(
        [{"method": "softmax"}]
        + grid("sea", k=[16, 32], predictor_length=[32, 64], nb_features=[16, 64])
        + [{"method": "sea", "k": 16, "predictor_length": 32, "nb_features": 64, "topk_group": "query"}]
    )},
    smoke_space={"attn": tune.grid_search(
        [{"method": "softmax"},
         {"method": "sea", "k": 4, "predictor_length": 8, "nb_features": 8, "loss_rows": 8}]
    )},
)
