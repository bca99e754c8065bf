"""``--kv-cache {none,int8,int4}``: the choice, and the cache object it stands for; and the compiled decode path
(``--no-compiled-decode`` turns it off). Kept apart from ``kv_cache.py`` so that a command's ``--help`` does not
import Transformers.

Why compiled decoding on CUDA by default: a GPU decode step is bound by kernel launches, and the adapters add about
fifteen small kernels per layer. With a static KV cache (fixed shapes) Transformers compiles the decode step with
``torch.compile(mode="reduce-overhead")``, which replays it as one CUDA graph; the adapters' eval forward traces as
one graph with no host synchronisation (modeling/adapter.py, tests/integration/test_prefix_cache.py), the sequence
routers' sums ride in fixed buffers (``StaticPrefixState``). On a CPU nothing changes: the compiled C decode kernel
serves there, and a CPU has no launches to save. Not with ``--kv-cache int8/int4`` (that cache is not static)."""

from __future__ import annotations

import inspect
import weakref
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



COMPILE_MODE = "reduce-overhead"  # CUDA graphs: one launch per decode step
_STATIC_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(batch, length): StaticCache}


def compiled_decode_applies(model, kind: str, compiled_decode: bool) -> bool:
    """Whether generation takes the compiled static-cache path: asked for, a full-precision cache, on CUDA, and not
    a base whose quantisation cannot be compiled (Transformers says which: ``hf_quantizer.is_compileable``)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return False
    return compiled_decode and kind == "none" and next(model.parameters()).device.type == "cuda"


def generation_cache_kwargs(model, kind: str, compiled_decode: bool = True) -> dict:
    """What ``model.generate`` gets for its cache: a static cache compiled into CUDA graphs where
    ``compiled_decode_applies``, else the cache ``--kv-cache`` names (``cache_kwargs(make_cache(...))``)."""
    if not compiled_decode_applies(model, kind, compiled_decode):
        return cache_kwargs(model, make_cache(model, kind))
    from transformers.generation import CompileConfig

    return {"cache_implementation": "static", "compile_config": CompileConfig(mode=COMPILE_MODE)}


def decode_cache_and_step(model, kind: str, compiled_decode: bool, batch: int, max_len: int, compile_config=None):
    """``(cache, forward)`` for a hand-written decoding loop (``benchmark``'s timing): on the compiled path a static
    cache of ``batch`` x ``max_len`` tokens (the same one for every loop of that shape: a CUDA graph keeps its
    addresses) and the model's compiled call (``compile_config``: default ``reduce-overhead``; tests pass another
    backend to trace the same graph on a CPU), else the cache ``--kv-cache`` names and the model itself. The prompt's
    pass may use either: only decode steps have the fixed shapes a graph replays."""
    if compile_config is None and not compiled_decode_applies(model, kind, compiled_decode):
        return make_cache(model, kind), model
    from transformers.cache_utils import StaticCache
    from transformers.generation import CompileConfig

    key = (batch, max_len)
    caches = _STATIC_CACHES.setdefault(model, {})
    if key not in caches:  # one per shape, reused (reset) by later loops: a CUDA graph keeps its addresses
        caches[key] = StaticCache(config=model.config, max_cache_len=max_len)
    cache = caches[key]
    cache.reset()
    return cache, model.get_compiled_call(compile_config or CompileConfig(mode=COMPILE_MODE))
