import dataclasses

from attention.config import MethodConfig, check_choice


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig(MethodConfig):
    """Dense softmax attention. kernel: 'sdpa' (flash/memory-efficient where the GPU has it) or
    'eager' (the reference, materialises T x S)."""

    kernel: str = "sdpa"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "kernel", ("sdpa", "eager"))
