"""Linear attention (Katharopoulos et al. 2020), feature maps elu + 1, relu and Performer FAVOR+."""

from attention.linear.chunked import LinearState, init_linear_state
from attention.linear.config import LinearConfig
from attention.linear.features import (
    FEATURE_MAPS,
    PerformerFeatures,
    elu_features,
    featurize_qk,
    orthogonal_random_projection,
    performer_features,
    performer_log_features,
    relu_features,
)
from attention.linear.mixer import LinearAttention
from attention.linear.ops import linear_attention, linear_attention_step
from attention.linear.reference import linear_attention_reference
from attention.registry import Capabilities, register

register("linear", LinearConfig,
         Capabilities(causal=True, cross=True, padding_mask=True, recurrent=True),
         "linear attention phi(q) (sum phi(k) v^T): elu, relu or Performer features; O(T) causal")(LinearAttention)

__all__ = [
    "FEATURE_MAPS", "LinearAttention", "LinearConfig", "LinearState", "PerformerFeatures", "elu_features",
    "featurize_qk", "init_linear_state", "linear_attention", "linear_attention_reference",
    "linear_attention_step", "orthogonal_random_projection", "performer_features",
    "performer_log_features", "relu_features",
]
