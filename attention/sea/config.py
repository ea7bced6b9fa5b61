import dataclasses

from attention.backend import BACKENDS
from attention.config import ConfigError, MethodConfig, check_acts, check_choice, check_float, check_int

TOPK_GROUPS = ("head", "query")


@dataclasses.dataclass(frozen=True)
class SeaConfig(MethodConfig):
    """SEA: sparse attention over a mask estimated in a compressed key width (Lee et al., ICLR 2024).

    k: keys each query attends to (per head), after the compressed mask is expanded back to keys.
    predictor_length: compressed key width P; each query's visible keys are split into P equal cells.
    nb_features: Performer random features m of the estimator; 0 = round(dim_head * ln dim_head).
    topk_group: 'head' = every (query, head) picks its own cells; 'query' = the heads of a query share
        one budget of heads * cells, picked jointly from all heads' estimates (SEA's causal_batch).
    loss_rows: query rows sampled per step for the estimation losses (their dense target costs
        rows x S, linear in T); 0 = every row (exact, quadratic time).
    estimator_loss_weight: weight of the estimation loss 0.1 KL + MSE, whose gradient is injected in
        training (it trains the predictor); 0 = the estimator stays the untrained Performer estimate.
    backend: the sparse attention kernel: 'auto' (Triton on CUDA), 'reference' (PyTorch) or 'triton'.
    """

    k: int = 32
    predictor_length: int = 64
    nb_features: int = 0
    topk_group: str = "head"
    loss_rows: int = 32
    estimator_loss_weight: float = 1.0
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_int(self, "k", min=1)
        check_int(self, "predictor_length", min=1)
        check_int(self, "nb_features", min=0)
        check_choice(self, "topk_group", TOPK_GROUPS)
        check_int(self, "loss_rows", min=0)
        check_float(self, "estimator_loss_weight", min=0.0)
        check_choice(self, "backend", BACKENDS)

    def check_seq_len(self, seq_len: int) -> None:
        for name in ("k", "predictor_length"):
            value = getattr(self, name)
            if value > seq_len:
                raise ConfigError(f"{self.method}.{name}: got {value} for sequences of {seq_len} tokens; "
                                  f"allowed: <= {seq_len}")
        check_acts(self, "k", self.k < seq_len, f"k={self.k} keeps every key of {seq_len}-token sequences")
