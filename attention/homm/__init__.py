"""HoMM: High-order Moment Models (Picard 2024), mixing by averaged high-order moments, no keys."""

from attention.homm.config import HoMMConfig
from attention.homm.mixer import HoMM
from attention.homm.ops import MomentState, expand_moments, homm_mix, init_moment_state, moment_mix, moment_step
from attention.homm.reference import moment_mix_reference
from attention.registry import Capabilities, register

register("homm", HoMMConfig, Capabilities(causal=True, cross=True, padding_mask=True, recurrent=True),
         "high-order moments of the context, selected by sigmoid gates; no keys, O(T) causal")(HoMM)

__all__ = ["HoMM", "HoMMConfig", "MomentState", "expand_moments", "homm_mix", "init_moment_state", "moment_mix",
           "moment_mix_reference", "moment_step"]
