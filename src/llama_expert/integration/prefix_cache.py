"""The sequence routers' ``PrefixState``, carried from pass to pass by the KV cache of a generation.

A sequence router (``sequence_aux_free``) needs, at each decoding step, the sum and count of the earlier tokens of
every sequence (docs/design.md section 2). That state belongs to one generation, not to the model: the server runs
generation after generation on one shared model, and a state left on the model would leak from one into the next.
So it rides on the generation's own KV cache object, which Transformers hands to every pass of that generation:

- before a pass (``PrefixCarrier.open``): a pass with no cache, or with a cache that holds 0 tokens, starts new
  sequences (an empty state); a pass whose cache holds tokens continues the state that cache carries (a cache that
  holds tokens but no state was filled elsewhere, and is refused);
- after it (``PrefixCarrier.close``): the state for the next pass is attached to the cache the pass returned (the
  one it was given, or the one the model made), and the pass's own state is cleared from the model. A compileable
  cache (Transformers' static cache, which compiled decoding captures in CUDA graphs) gets a ``StaticPrefixState``:
  sums in fixed buffers, updated in place.

Beam search reorders the cache's rows (``reorder_cache``) and Transformers may select or repeat them
(``batch_select_indices``, ``batch_repeat_interleave``): those methods of that one cache instance are wrapped, so
the state follows its rows. Tokens taken back from a cache (``crop``, assisted decoding) cannot be taken out of a
running sum: that is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the CLI imports this module; Transformers loads only when a model does (serve tries its port first)
    from transformers.cache_utils import Cache

import torch

from ..errors import ConfigError
from ..modeling.routing import PrefixState, StaticPrefixState

STATE = "llama_expert_prefix_state"  # attribute on the cache object
FOLLOWS = (("reorder_cache", PrefixState.select), ("batch_select_indices", PrefixState.select),
           ("batch_repeat_interleave", PrefixState.repeat_interleave))


def given_cache(kwargs) -> Optional[Cache]:
    """The KV cache passed to this forward call (``cache`` since Transformers 5, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def returned_cache(output) -> Optional[Cache]:
    """The KV cache a forward call returned. Only the field the output has is read: reading ``past_key_values``
    from an output that names it ``cache`` prints Transformers' deprecation message (once per training run)."""
    if dataclasses.is_dataclass(output):
        names = {field.name for field in dataclasses.fields(output)}
        return getattr(output, "cache" if "cache" in names else "past_key_values", None)
    if isinstance(output, tuple):  # return_dict=False
        from transformers.cache_utils import Cache

        return next((item for item in output if isinstance(item, Cache)), None)
    return None


def cached_tokens(cache) -> int:
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


def state_for_pass(cache) -> PrefixState:
    """An empty state for new sequences, else the one ``cache`` carries. Inside a compiled pass (a decode step with
    a static cache, after an eager prompt pass) the cache's state is taken as it is: counting its tokens would read
    them back to the host, which a CUDA graph cannot do."""
    if torch.compiler.is_compiling() and cache is not None and getattr(cache, STATE, None) is not None:
        return getattr(cache, STATE)
    if cache is None or cached_tokens(cache) == 0:
        return PrefixState()
    state = getattr(cache, STATE, None)
    if state is None:
        raise ConfigError(f"this KV cache holds {cached_tokens(cache)} tokens but not the sequence router's running "
                          f"sums of them (it was filled by another model, or before the adapters were added); "
                          f"start from an empty cache, or pass no cache.")
    return state


def attach(cache, state: PrefixState) -> None:
    """Let ``cache`` carry ``state``; the first time, make its row-moving methods move the state too.

    The wrappers reach the cache through a weak reference and its methods by name on its class: a wrapper that
    held the cache (or its bound method) would make a reference cycle, and every pass's cache, key/value tensors
    and all, would wait for the cyclic garbage collector (an evaluation held gigabytes)."""
    if getattr(cache, "is_compileable", False) and not isinstance(state, StaticPrefixState):
        state = static_state(cache, state)
    if not hasattr(cache, STATE):
        owner = weakref.ref(cache)
        for name, move in FOLLOWS:
            if hasattr(cache, name):
                setattr(cache, name, _following(owner, name, move))
        if hasattr(cache, "crop"):
            setattr(cache, "crop", _refusing_crop(owner))
    setattr(cache, STATE, state)


def static_state(cache, state: PrefixState) -> StaticPrefixState:
    """A static cache is there to be captured in CUDA graphs, so are the sums: in fixed buffers, the very buffers
    the cache's last generation used when they fit (a reused static cache keeps its graphs' addresses)."""
    previous = getattr(cache, STATE, None)
    if isinstance(previous, StaticPrefixState) and previous.refill(state.before):
        return previous
    return StaticPrefixState(state.before)


def _following(owner, name, move):
    def moved(argument, *args, **kwargs):
        cache = owner()
        result = getattr(type(cache), name)(cache, argument, *args, **kwargs)
        state = getattr(cache, STATE, None)
        if state is not None:
            move(state, argument)
        return result
    return moved


def _refusing_crop(owner):
    def cropped(*args, **kwargs):
        cache = owner()
        before = cached_tokens(cache)
        result = type(cache).crop(cache, *args, **kwargs)
        if getattr(cache, STATE, None) is not None and cached_tokens(cache) not in (0, before):
            raise ConfigError("a sequence router cannot take tokens back out of its running sums, so it does not "
                              "support assisted or speculative decoding (they crop the KV cache); generate without "
                              "an assistant model.")
        return result
    return cropped


class PrefixCarrier:
    """The two model hooks that give each pass its state and hand the next state to the cache."""

    def __init__(self, token_mask):
        self.token_mask = token_mask
        self.cache = None

    def open(self, module, args, kwargs) -> None:
        self.cache = given_cache(kwargs)
        self.token_mask.prefix = state_for_pass(self.cache)

    def close(self, module, args, kwargs, output) -> None:  # always called, also when the pass raised
        state, self.token_mask.prefix = self.token_mask.prefix, None
        cache, self.cache = (returned_cache(output) if output is not None else None) or self.cache, None
        if state is not None and cache is not None and output is not None:
            attach(cache, state.following())
