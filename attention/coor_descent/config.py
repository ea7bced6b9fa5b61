import dataclasses

from attention.backend import BACKENDS
from attention.config import ConfigError, MethodConfig, check_acts, check_choice, check_float, check_int


@dataclasses.dataclass(frozen=True)
class CoorDescentConfig(MethodConfig):
    """Coordinate-descent attention: softmax over q.k replaced by a soft top-k with budget k.

    k: keys each query spreads its weight over (a row with fewer visible keys uses them all);
    n_iters, eps, eps_init, eps_decay: coordinate descent (eps_init None = start at eps, no scaling);
    the defaults converge (rows sum to k within 1%) for scores of unit scale, see README.
    backend: 'auto' = the fused Triton kernel on CUDA, the reference elsewhere.
    """

    k: int = 32
    n_iters: int = 50
    eps: float = 0.1
    eps_init: float | None = 1.0
    eps_decay: float = 0.85
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_int(self, "k", min=1)
        check_int(self, "n_iters", min=1)
        check_float(self, "eps", min=0.0, min_exclusive=True)
        if self.eps_init is not None:
            check_float(self, "eps_init", min=0.0, min_exclusive=True)
        check_float(self, "eps_decay", min=0.0, max=1.0, min_exclusive=True)
        check_choice(self, "backend", BACKENDS)

    def check_seq_len(self, seq_len: int) -> None:
        if self.k > seq_len:
            raise ConfigError(f"{self.method}.k: got {self.k} for sequences of {seq_len} "
                              f"tokens; allowed: 1 <= k <= {seq_len}")
        check_acts(self, "k", self.k < seq_len,
                   f"k={self.k} keeps every key of {seq_len}-token sequences")
