"""Causal sequence-level routing: aux_free on the mean of the sequence so far, docs/design.md section 2.

Why: token-level routers barely follow the domain of the text (domain-expert NMI 0.03-0.09 over the middle layers,
docs/results/README.md); routing every token by its sequence's context gives topical experts (Fan et al. 2024). Taking
the mean over tokens 0..t only, never over the whole sequence, keeps the router causal, so training, a full
forward pass and step-by-step decoding route alike.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ..decode_kernel import KernelRouting
from .aux_free import AuxFreeRouter
from .prefix_state import PrefixMeanRouting
from .registry import register_router


@register_router("sequence_aux_free")
class SequenceAuxFreeRouter(PrefixMeanRouting, AuxFreeRouter):
    """Token t of a sequence is routed by the mean ``m_t`` of the router inputs ``h_s`` of its sequence's
    non-padding tokens ``s <= t``, then exactly as ``aux_free`` routes a token:

    ``m_t = sum_{s<=t, s not padding} h_s / max(1, #{s <= t, s not padding})``, ``z = m_t W_g``,
    ``chosen = top-k(z + b)``, ``g = softmax(z[chosen])``, with aux_free's balancing bias ``b``, losses and
    statistics (the inherited ``forward`` routes whatever [N, d] vectors it is given: here the means).

    ``route_sequences`` takes the hidden states as [B, T, d] and the pass context (``sequence_prefix_means``): the
    masked cumulative sum over the sequence axis gives every prefix mean of a full pass at once; with a KV cache, the
    sum and count of the earlier tokens come from the context's ``PrefixState`` (none: the sequences start here),
    and the new totals go back into it for the next pass. The decode fast path and the compiled kernel route by the
    same means and keep the same sums (``PrefixMeanRouting``).
    """

    def logits(self, means: torch.Tensor, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W_g m_t``: the prefix's length (``counts``) does not enter."""
        return F.linear(means, self.weight)

    def kernel_routing(self) -> KernelRouting:
        return dataclasses.replace(super().kernel_routing(), prefix_mean=True)
