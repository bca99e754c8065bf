"""``--kv-cache {none,int8,int4}``: the choice, and the cache object it stands for. Kept apart from
``kv_cache.py`` so that a command's ``--help`` does not import Transformers."""

from __future__ import annotations

import inspect
from typing import Optional

from ..errors import ConfigError

KV_CACHE_CHOICES = ("none", "int8", "int4")


def make_cache(model, kind: str, residual_length: int = 64) -> Optional[object]:
    """The cache ``--kv-cache`` names: None for 'none' (the model's default), else a ``KVCacheCompressor``."""
    if kind not in KV_CACHE_CHOICES:
        raise ConfigError(f"--kv-cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {kind!r}.")
    if kind == "none":
        return None
    from .kv_cache import KVCacheCompressor

    return KVCacheCompressor(model.config, bits=8 if kind == "int8" else 4, residual_length=residual_length)


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model.generate`` / ``model(...)``, or {} for no cache. Transformers 5 renamed the
    argument ``past_key_values`` to ``cache`` (the old name warns, and goes in 6.0)."""
    if cache is None:
        return {}
    return {"cache" if "cache" in forward_parameters(model) else "past_key_values": cache}


def forward_parameters(model):
    """The parameters of the Transformers model's ``forward``; for a PEFT model (a LoRA adapter), whose own
    forward takes ``**kwargs``, those of the model inside it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(inner.forward).parameters

