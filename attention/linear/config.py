import dataclasses

from attention.backend import BACKENDS
from attention.config import MethodConfig, check_choice, check_float, check_int


@dataclasses.dataclass(frozen=True)
class LinearConfig(MethodConfig):
    """Linear attention (Katharopoulos et al. 2020) with a choice of feature map.

    feature_map: 'elu' (elu + 1), 'relu', or 'performer' (FAVOR+ positive random features).
    nb_features: Performer's random features m per head; 0 = round(dim_head * ln dim_head).
    redraw: Performer: draw a fresh projection every N training steps; 0 = never.
    chunk_size: tokens per chunk of the causal form (C x C products inside, a state across).
    eps: floor on the normaliser phi(q) . sum phi(k).
    backend: 'auto' (the Triton kernel on CUDA where it applies), 'reference' (PyTorch) or 'triton'.
    """

    feature_map: str = "elu"
    nb_features: int = 0
    redraw: int = 0
    chunk_size: int = 64
    eps: float = 1e-6
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "feature_map", ("elu", "relu", "performer"))
        check_int(self, "nb_features", min=0)
        check_int(self, "redraw", min=0)
        check_int(self, "chunk_size", min=1)
        check_float(self, "eps", min=0.0, min_exclusive=True)
        check_choice(self, "backend", BACKENDS)
