"""Softmax attention: the baseline every method is measured against."""

from attention.registry import Capabilities, register
from attention.softmax.config import SoftmaxConfig
from attention.softmax.mixer import SoftmaxAttention, softmax_attention
from attention.softmax.reference import softmax_attention_reference

register("softmax", SoftmaxConfig, Capabilities(causal=True, cross=True, padding_mask=True),
         "dense softmax attention (SDPA / flash), the baseline")(SoftmaxAttention)

__all__ = ["SoftmaxAttention", "SoftmaxConfig", "softmax_attention", "softmax_attention_reference"]
