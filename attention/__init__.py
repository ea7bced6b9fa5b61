"""attnlab's attention library: efficient attention methods as token mixers, pure torch + triton.

    import attention
    cfg = attention.make_config("topk", k=16, causal=True)
    mixer = attention.build(cfg, dim=256)      # (B, T, 256) -> (B, T, 256)
"""

from attention.config import ConfigError, MethodConfig

_REGISTRY = ("Capabilities", "MethodSpec", "build", "build_feedforward", "config_from_dict", "get",
             "make_config", "methods")


def __getattr__(name: str):
    # The registry imports torch and every method: loaded on first use, so that `attention.config` (the
    # error type, config dataclasses) stays light for the sweep CLI, which checks its arguments and
    # starts Ray while torch loads.
    if name in _REGISTRY:
        from attention import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'attention' has no attribute {name!r}")


__all__ = ["ConfigError", "MethodConfig", *_REGISTRY]
