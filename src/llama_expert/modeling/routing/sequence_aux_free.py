"""Causal sequence-level routing: aux_free on the mean of the sequence so far, docs/design.md section 2.

Why: token-level routers barely follow the domain of the text (domain-expert NMI 0.03-0.09 over the middle layers,
docs/results/README.md); routing every token by its sequence's context gives topical experts (Fan et al. 2024). Taking
the mean over tokens 0..t only, never over the whole sequence, keeps the router causal, so training, a full
forward pass and step-by-step decoding route alike.
"""

from __future__ import annotations

from typing import Optional

import torch

from .aux_free import AuxFreeRouter
from .base import in_backward_pass
from .losses import Routing
from .prefix_state import PrefixState
from .registry import register_router


@register_router("sequence_aux_free")
class SequenceAuxFreeRouter(AuxFreeRouter):
    """Token t of a sequence is routed by the mean ``m_t`` of the router inputs ``h_s`` of its sequence's
    non-padding tokens ``s <= t``, then exactly as ``aux_free`` routes a token:

    ``m_t = sum_{s<=t, s not padding} h_s / max(1, #{s <= t, s not padding})``, ``z = m_t W_g``,
    ``chosen = top-k(z + b)``, ``g = softmax(z[chosen])``, with aux_free's balancing bias ``b``, losses and
    statistics (the inherited ``forward`` routes whatever [N, d] vectors it is given: here the means).

    ``route_sequences`` takes the hidden states as [B, T, d] and the pass context: the masked cumulative sum over
    the sequence axis gives every prefix mean of a full pass at once; with a KV cache, the sum and count of the
    earlier tokens come from the context's ``PrefixState`` (none: the sequences start here), and the new totals go
    back into it for the next pass. No per-token inference form: the decode fast path and the compiled kernel
    route by each token's own ``h``, so this router's adapters take the general path.
    """

    sequence_level = True
    has_inference_gates = False

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("sequence_aux_free routes by the prefix mean, not by each token's own logits")

    def kernel_routing(self):
        return None

    def route_sequences(self, hidden: torch.Tensor, context) -> Routing:
        batch = hidden if hidden.dim() == 3 else hidden.reshape(1, -1, hidden.shape[-1])  # [N, d]: one sequence
        flat_mask = context.for_hidden(hidden) if context is not None else None
        mask = flat_mask.view(batch.shape[:2]) if flat_mask is not None else None
        prefix = context.prefix if context is not None else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            means = self.prefix_means(batch.float(), mask, prefix)
        return self(means.reshape(-1, means.shape[-1]), flat_mask, batch.shape[0])

    def prefix_means(self, hidden: torch.Tensor, mask: Optional[torch.Tensor],
                     prefix: Optional[PrefixState]) -> torch.Tensor:
        """[B, T, d] ``m_t``: running sums over the sequence axis, started from what earlier passes left. Padding
        is left out with ``where``, not a product: a padding row's hidden state may be NaN (it attends to nothing)."""
        if mask is None:
            total = hidden.cumsum(dim=1)
            count = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device).expand(
                hidden.shape[:2])
        else:
            total = torch.where(mask.unsqueeze(-1), hidden, hidden.new_zeros(())).cumsum(dim=1)
            count = mask.to(hidden.dtype).cumsum(dim=1)
        before = prefix.read(self) if prefix is not None else None
        if before is not None:
            total = total + before[0].to(total.device).unsqueeze(1)
            count = count + before[1].to(count.device).unsqueeze(1)
        if prefix is not None and not in_backward_pass():
            prefix.write(self, total[:, -1], count[:, -1])
        return total / count.clamp_min(1.0).unsqueeze(-1)
