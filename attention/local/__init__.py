"""Local attention: each query attends to a band of nearby windows; memory linear in T."""

from attention.local.config import LocalConfig
from attention.local.mixer import LocalAttention, local_attention
from attention.local.reference import local_attention_reference, local_band_mask
from attention.registry import Capabilities, register

register("local", LocalConfig, Capabilities(causal=True, cross=False, padding_mask=True),
         "sliding-window attention over neighbouring windows, memory linear in T")(LocalAttention)

__all__ = ["LocalAttention", "LocalConfig", "local_attention", "local_attention_reference",
           "local_band_mask"]
