"""Explicit top-k sparse attention: each query keeps its k highest-scoring keys."""

from attention.registry import Capabilities, register
from attention.topk.config import TopkConfig
from attention.topk.mixer import TopkAttention, topk_attention
from attention.topk.reference import topk_attention_reference

register("topk", TopkConfig, Capabilities(causal=True, cross=True, padding_mask=True),
         "explicit top-k sparse attention, query-chunked (memory chunk x S)")(TopkAttention)

__all__ = ["TopkAttention", "TopkConfig", "topk_attention", "topk_attention_reference"]
