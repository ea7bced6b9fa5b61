"""CoLT5 conditional computation (Ainslie et al. 2023): routed attention and routed feed-forward."""

from attention.colt5 import causal_router  # noqa: F401  (tests tune its chunk size)
from attention.colt5.autoregressive import RoutedAutoregressiveAttention
from attention.colt5.config import Colt5Config
from attention.colt5.cross import RoutedCrossAttention
from attention.colt5.feedforward import CausalRoutedFeedForward, RoutedFeedForward
from attention.colt5.mixer import colt5_feedforward, colt5_mixer
from attention.colt5.routed import RoutedAttention, RoutedHeavyAttention
from attention.colt5.router import CoordinateDescentRouter
from attention.registry import Capabilities, register

register("colt5", Colt5Config, Capabilities(causal=True, cross=True, padding_mask=True),
         "CoLT5: light local attention + heavy attention on coordinate-descent-routed tokens, routed ff",
         feedforward=colt5_feedforward)(colt5_mixer)

__all__ = ["CausalRoutedFeedForward", "Colt5Config", "CoordinateDescentRouter", "RoutedAttention",
           "RoutedAutoregressiveAttention", "RoutedCrossAttention", "RoutedFeedForward",
           "RoutedHeavyAttention", "colt5_feedforward", "colt5_mixer"]
