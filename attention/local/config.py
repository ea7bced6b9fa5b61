import dataclasses

from attention.backend import BACKENDS
from attention.config import ConfigError, MethodConfig, check_acts, check_choice, check_int


@dataclasses.dataclass(frozen=True)
class LocalConfig(MethodConfig):
    """Sliding-window (local) attention.

    The sequence is cut into windows of `window_size` positions; a query in window n sees the keys of
    windows n - look_backward .. n + look_forward (and only keys <= itself when causal).
    look_forward=None means 0 when causal, 1 otherwise; an explicit look_forward > 0 with causal=True
    is an error, since a causal model must not see the future.
    """

    window_size: int = 64
    look_backward: int = 1
    look_forward: int | None = None
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_int(self, "window_size", min=1)
        check_int(self, "look_backward", min=0)
        check_choice(self, "backend", BACKENDS)
        if self.look_forward is not None:
            check_int(self, "look_forward", min=0)
            if self.causal and self.look_forward > 0:
                raise ConfigError(
                    f"{self.method}.look_forward: got {self.look_forward} with causal=True; a causal model "
                    "must not see later windows; allowed: 0 or None (None = 0 when causal, 1 otherwise)")

    def check_seq_len(self, seq_len: int) -> None:
        windows = -(-seq_len // self.window_size)
        # every query sees every key it may (full attention) once the windows around it cover the sequence
        reach = self.look_backward if self.causal else min(self.look_backward, self.forward_windows)
        check_acts(self, "window_size", windows - 1 > reach,
                   f"window_size={self.window_size} with look_backward={self.look_backward} lets every query "
                   f"see the whole {seq_len}-token sequence: full attention")

    @property
    def forward_windows(self) -> int:
        """look_forward with the default resolved: 0 when causal, 1 otherwise."""
        if self.look_forward is not None:
            return self.look_forward
        return 0 if self.causal else 1
