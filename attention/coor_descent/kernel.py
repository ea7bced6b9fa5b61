"""Triton kernels of coordinate descent: the (rows, n) routing op and the fused attention.

kernel_rows.py: coor_descent_triton, same semantics as reference.coor_descent_reference.
kernel_attention.py (+ kernel_attention_bwd.py): coor_descent_attention_triton, same semantics as
attention_reference.coor_descent_attention_reference, with no (T, S) tensor.
Importing this module needs triton; ops.py imports it lazily.
"""

from attention.coor_descent.kernel_attention import coor_descent_attention_triton
from attention.coor_descent.kernel_rows import coor_descent_triton

__all__ = ["coor_descent_attention_triton", "coor_descent_triton"]
