"""``KVCacheCompressor``: a KIVI-style quantised key/value cache that ``model.generate`` accepts.

KIVI (Liu et al. 2024) observes that keys have a few outlier *channels* and values do not, so it quantises
keys per channel and values per token. Here, with ``bits`` in {8, 4}, a window of ``residual_length`` (``R``)
tokens and groups of ``group_size`` (``G``, 32 as in KIVI):

- the newest tokens stay in full precision until ``R`` of them have gathered; then those ``R`` keys are
  quantised per (head, channel) in groups of ``G`` consecutive tokens, and the ``R`` values per (head, token)
  in groups of ``G`` channels (asymmetric min-max, round to nearest; when ``G`` does not divide ``R``, keys
  are grouped by the largest number of tokens that divides both);
- codes are stored as uint8 (two 4-bit codes per byte at int4), minimum and step as float16;
- every attention call dequantises the stored part and appends the full-precision window and the new
  tokens, so a prompt's own attention (prefill) is exact and later tokens read the compressed past.

Why our own and not Transformers' ``QuantizedCache``: that cache quantises keys and values alike (per
channel, groups of ``q_group_size``), needs the optimum-quanto or HQQ package, and re-quantises the whole
cache, old codes included, each time its window fills. Here each token is quantised once, in the layout the
paper found accurate, with plain torch. ``benchmarks/kv_cache.py`` measures both side by side.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from ..errors import ConfigError

def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def quantize(x: torch.Tensor, dim: int, bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 codes, minimum, step) of ``x`` with one group along ``dim`` (min-max, round to nearest).

    Minimum and step are stored as float16, rounded so that they still cover the group (the minimum down, the
    step up), and the codes are computed from the stored values: every element is within half a step."""
    levels = (1 << bits) - 1
    low32, high32 = x.amin(dim=dim, keepdim=True).float(), x.amax(dim=dim, keepdim=True).float()
    low = low32.half()
    low = torch.where(low.float() > low32, torch.nextafter(low, torch.full_like(low, -float("inf"))), low)
    step = ((high32 - low.float()) / levels).clamp_min(1e-6).half()
    step = torch.where(step.float() * levels < high32 - low.float(),
                       torch.nextafter(step, torch.full_like(step, float("inf"))), step)
    codes = ((x.float() - low.float()) / step.float()).round_().clamp_(0, levels).to(torch.uint8)
    return _pack(codes, bits), low, step


def dequantize(packed: torch.Tensor, low: torch.Tensor, step: torch.Tensor, bits: int, dtype) -> torch.Tensor:
    return (_unpack(packed, bits).float() * step.float() + low.float()).to(dtype)


class CompressedLayer(BaseQuantizedLayer):
    """One decoder layer's cache: quantised keys (per channel, groups of tokens) and values (per token, groups of
    channels), plus the full-precision window (``self.keys`` / ``self.values``, fewer than R tokens)."""

    def __init__(self, bits: int = 4, residual_length: int = 64, group_size: int = 32):
        super().__init__()
        self.bits, self.residual_length = bits, residual_length
        # tokens per key group: G, or the largest divisor of both G and R when G does not divide R (R is always a
        # whole number of key groups)
        self.key_group = math.gcd(group_size, residual_length)
        self.group_size = group_size  # channels per value group (the whole head when it does not divide it)
        self._stored: Optional[List[torch.Tensor]] = None  # key codes, key min, key step, value codes, min, step

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.bits == 4 and key_states.shape[-1] % 2:
            raise ConfigError(f"int4 KV cache needs an even head size; this model's is {key_states.shape[-1]}.")

    def value_group(self, head_size: int) -> int:
        return self.group_size if head_size % self.group_size == 0 else head_size

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantise ``keys``/``values`` (a whole number of R-token windows) and append them to the stored part."""
        b, h, t, d = keys.shape
        groups = keys.reshape(b, h, t // self.key_group, self.key_group, d)
        k_codes, k_low, k_step = quantize(groups, dim=-2, bits=self.bits)  # per channel over G tokens
        width = self.value_group(d)
        v_codes, v_low, v_step = quantize(values.reshape(b, h, t, d // width, width), dim=-1, bits=self.bits)
        new = [k_codes.flatten(2, 3), k_low, k_step, v_codes, v_low, v_step]  # per token over G channels
        self._stored = new if self._stored is None else [torch.cat([old, part], dim=2)
                                                         for old, part in zip(self._stored, new)]

    def _restore(self, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        k_codes, k_low, k_step, v_codes, v_low, v_step = self._stored
        b, h, t = k_codes.shape[:3]
        codes = _unpack(k_codes, self.bits).reshape(b, h, t // self.key_group, self.key_group, -1)
        keys = (codes.float() * k_step.float() + k_low.float()).flatten(2, 3).to(dtype)
        return keys, dequantize(v_codes, v_low, v_step, self.bits, dtype).flatten(-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # the full-precision tokens: what waited in the window, then this call's
        window = torch.cat(([self.keys] if self.keys.dim() == 4 else []) + [key_states], dim=-2)
        window_values = torch.cat(([self.values] if self.values.dim() == 4 else []) + [value_states], dim=-2)
        keys, values = window, window_values
        if self._stored is not None:
            stored_keys, stored_values = self._restore(key_states.dtype)
            keys, values = torch.cat([stored_keys, window], dim=-2), torch.cat([stored_values, window_values], dim=-2)
        full = window.shape[-2] - window.shape[-2] % self.residual_length  # whole groups leave the window
        if full:
            self._store(window[..., :full, :], window_values[..., :full, :])
        self.keys, self.values = window[..., full:, :].contiguous(), window_values[..., full:, :].contiguous()
        return keys, values  # this call's attention: the restored past and the new tokens in full precision

    def _quantize(self, tensor, axis=None):  # the base class's hooks; this layer stores groups itself
        raise NotImplementedError

    def _dequantize(self, q_tensor):
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self._stored = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self._stored is not None:
            self._stored = [part[indices, ...] for part in self._stored]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self._stored is not None:
            self._stored = [part.repeat_interleave(repeats, dim=0) for part in self._stored]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def nbytes(self) -> int:
        """Bytes this layer holds now: codes, minima and steps, and the full-precision window."""
        parts = (self._stored or []) + [t for t in (self.keys, self.values) if t is not None and t.dim() == 4]
        return sum(t.numel() * t.element_size() for t in parts)


class KVCacheCompressor(Cache):
    """A KIVI-style int8/int4 key/value cache for ``model.generate(past_key_values=...)`` and forward calls.

    ``KVCacheCompressor(model.config, bits=4, residual_length=64)``; ``nbytes()`` reports what it holds.
    """

    def __init__(self, config, bits: int = 4, residual_length: int = 64, group_size: int = 32):
        if bits not in (4, 8):
            raise ConfigError(f"KVCacheCompressor supports 8 or 4 bits, got {bits}.")
        if residual_length < 1:
            raise ConfigError(f"residual_length must be >= 1, got {residual_length}.")
        if group_size < 2 or group_size % 2:
            raise ConfigError(f"group_size must be an even number >= 2, got {group_size}.")
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ConfigError(f"KVCacheCompressor supports models whose layers all use full attention; this one "
                              f"has {sorted(layer_types)}.")
        self.bits, self.residual_length, self.group_size = bits, residual_length, group_size
        super().__init__(layers=[CompressedLayer(bits, residual_length, group_size)
                                 for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
