"""Coordinate descent (soft top-k) and coordinate-descent attention."""

from attention.coor_descent.config import CoorDescentConfig
from attention.coor_descent.mixer import CoorDescentAttention
from attention.coor_descent.ops import TopK, convergence, coor_descent, coor_descent_attention, topk
from attention.coor_descent.reference import coor_descent_attention_reference, coor_descent_dual, coor_descent_reference
from attention.registry import Capabilities, register

register("coor_descent", CoorDescentConfig, Capabilities(causal=True, cross=True, padding_mask=True),
         "attention with softmax replaced by coordinate descent (soft top-k, budget k)")(
    CoorDescentAttention)

__all__ = ["CoorDescentAttention", "CoorDescentConfig", "TopK", "convergence", "coor_descent",
           "coor_descent_attention", "coor_descent_attention_reference", "coor_descent_dual",
           "coor_descent_reference", "topk"]
