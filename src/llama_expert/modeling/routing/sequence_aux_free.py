"""Causal sequence-level routing: aux_free on the mean of the sequence so far, docs/design.md section 2.

Why: token-level routers barely follow the domain of the text (domain-expert NMI 0.03-0.09 over the middle layers,
docs/results/README.md); routing every token by its sequence's context gives topical experts (Fan et al. 2024). Taking
the mean over tokens 0..t only, never over the whole sequence, keeps the router causal, so training, a full
forward pass and step-by-step decoding route alike.
"""

from __future__ import annotations

import torch

from .aux_free import AuxFreeRouter
from .losses import Routing
from .prefix_state import sequence_prefix_means
from .registry import register_router


@register_router("sequence_aux_free")
class SequenceAuxFreeRouter(AuxFreeRouter):
    """Token t of a sequence is routed by the mean ``m_t`` of the router inputs ``h_s`` of its sequence's
    non-padding tokens ``s <= t``, then exactly as ``aux_free`` routes a token:

    ``m_t = sum_{s<=t, s not padding} h_s / max(1, #{s <= t, s not padding})``, ``z = m_t W_g``,
    ``chosen = top-k(z + b)``, ``g = softmax(z[chosen])``, with aux_free's balancing bias ``b``, losses and
    statistics (the inherited ``forward`` routes whatever [N, d] vectors it is given: here the means).

    ``route_sequences`` takes the hidden states as [B, T, d] and the pass context (``sequence_prefix_means``): the
    masked cumulative sum over the sequence axis gives every prefix mean of a full pass at once; with a KV cache, the
    sum and count of the earlier tokens come from the context's ``PrefixState`` (none: the sequences start here),
    and the new totals go back into it for the next pass. No per-token inference form: the decode fast path and the
    compiled kernel route by each token's own ``h``, so this router's adapters take the general path.
    """

    sequence_level = True
    has_inference_gates = False

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("sequence_aux_free routes by the prefix mean, not by each token's own logits")

    def kernel_routing(self):
        return None

    def route_sequences(self, hidden: torch.Tensor, context) -> Routing:
        return self(*sequence_prefix_means(self, hidden, context))
