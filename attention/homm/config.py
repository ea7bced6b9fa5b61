import dataclasses

from attention.backend import BACKENDS
from attention.config import MethodConfig, check_choice, check_int


@dataclasses.dataclass(frozen=True)
class HoMMConfig(MethodConfig):
    """High-order moment mixing (Picard 2024). No heads: `heads` and `dim_head` are not used.

    order: highest moment order o (1 = the mean of the projected tokens).
    order_expand: width of each order's moments as a multiple of dim_hidden.
    dim_hidden: base width of the moment space; 0 = the model width. The moment space has
    order * order_expand * dim_hidden features.
    backend: 'auto' (the fused Triton kernel on CUDA, order <= 4), 'reference' (PyTorch) or 'triton'.
    """

    order: int = 2
    order_expand: int = 2
    dim_hidden: int = 0
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_int(self, "order", min=1)
        check_int(self, "order_expand", min=1)
        check_int(self, "dim_hidden", min=0)
        check_choice(self, "backend", BACKENDS)
