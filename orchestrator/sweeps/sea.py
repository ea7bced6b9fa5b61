"""SEA (estimated sparse attention) against the softmax baseline on the character LM: keys per query k,
the compressed width (predictor_length) and the estimator's Performer features (nb_features), plus
top-k grouped across heads. Each SEA trial trains its estimator from its own attention (sampled rows,
linear in T); distillation from a trained softmax teacher is the `distill` workload."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec, grid
from orchestrator.sweeps._sizes import CPU_SHOWS, GPU_SHOWS, LM_CPU, LM_GPU

SWEEP = SweepSpec(
    name="sea",
    description=__doc__,
    workload="lm",
    smoke=Profile(seeds=(0,), shows="tests the machinery", space={"attn": tune.grid_search(
        [{"method": "softmax"}, {"method": "sea", "k": 4, "predictor_length": 8, "nb_features": 8, "loss_rows": 8}])}),
    cpu=Profile(base=LM_CPU, seeds=(0, 1), shows=CPU_SHOWS, space={"attn": tune.grid_search(
        [{"method": "softmax"}]
        + grid("sea", k=[16, 32], predictor_length=[32, 64], nb_features=[16, 64])
        + [{"method": "sea", "k": 16, "predictor_length": 32, "nb_features": 64, "topk_group": "query"}])}),
    gpu=Profile(base=LM_GPU, seeds=(0, 1, 2), shows=GPU_SHOWS, space={"attn": tune.grid_search(
        [{"method": "softmax"}]
        + grid("sea", k=[32, 128], predictor_length=[64, 128], nb_features=[64])
        + [{"method": "sea", "k": 64, "predictor_length": 128, "nb_features": 64, "topk_group": "query"}])}),
)
