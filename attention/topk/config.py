import dataclasses

from attention.backend import BACKENDS
from attention.config import ConfigError, MethodConfig, check_acts, check_choice, check_int


@dataclasses.dataclass(frozen=True)
class TopkConfig(MethodConfig):
    """Explicit top-k sparse attention: each query keeps its k highest-scoring visible keys.

    k: keys kept per query (a row with fewer visible keys uses them all);
    query_chunk: queries processed at once, so peak memory is query_chunk x S, not T x S.
    backend: 'auto' = per-row thresholds + flex_attention's fused kernels on CUDA (flex.py), the chunked
    PyTorch op elsewhere; 'reference' = the chunked op everywhere; 'triton' = the flex path.
    """

    k: int = 32
    query_chunk: int = 1024
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_int(self, "k", min=1)
        check_int(self, "query_chunk", min=1)
        check_choice(self, "backend", BACKENDS)

    def check_seq_len(self, seq_len: int) -> None:
        if self.k > seq_len:
            raise ConfigError(f"{self.method}.k: got {self.k} for sequences of {seq_len} tokens; "
                              f"allowed: 1 <= k <= {seq_len}")
        check_acts(self, "k", self.k < seq_len, f"k={self.k} keeps every key of {seq_len}-token sequences")
