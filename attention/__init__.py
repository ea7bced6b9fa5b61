"""attnlab's attention library: efficient attention methods as token mixers, pure torch + triton.

    import attention
    cfg = attention.make_config("topk", k=16, causal=True)
    mixer = attention.build(cfg, dim=256)      # (B, T, 256) -> (B, T, 256)
"""

from attention.config import ConfigError, MethodConfig
from attention.registry import (
    Capabilities,
    MethodSpec,
    build,
    build_feedforward,
    config_from_dict,
    get,
    make_config,
    methods,
)

__all__ = [
    "Capabilities", "ConfigError", "MethodConfig", "MethodSpec", "build", "build_feedforward",
    "config_from_dict", "get", "make_config", "methods",
]
