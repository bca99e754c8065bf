"""Noisy top-k gating (Shazeer et al. 2017), docs/design.md section 2.

The router always runs in float32: bf16 logits tie and flip top-k choices between runs, and the
z-loss squares a logsumexp that overflows half precision quickly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..decode_kernel import KernelRouting
from .base import RouterBase, chosen_gates
from .losses import Routing, data_parallel_draw, gate_matrix
from .registry import register_router


@register_router("noisy_top_k")
class NoisyTopKGating(RouterBase):
    """Router ``z = h W_g``; in training adds ``eps * softplus(h W_noise)``; keeps the top k.

    After each forward the module holds the losses of that pass (``aux_loss``, ``z_loss``; None after
    an eval-mode pass under ``torch.no_grad``, where nothing could use them). With ``record_statistics``
    on, it also adds its choices to ``expert_counts`` (and router entropy to ``entropy_sum``). Decoding
    runs this module once per layer per token, so the inference path does only logits, top-k and gates.
    """

    per_expert_parameters = ("weight", "noise_weight")
    has_inference_gates = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, noise: bool = True):
        super().__init__(num_experts, top_k)
        self.noise = noise
        self.weight = self.gate_weight(hidden_size, num_experts)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32)) \
            if noise else None

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "NoisyTopKGating":
        return cls(hidden_size, num_experts, config.top_k, noise=config.router_noise)

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        top_logits, indices = logits.topk(self.top_k, dim=-1)  # eval: no noise
        return gate_matrix(indices, torch.softmax(top_logits, dim=-1), self.num_experts)

    def kernel_routing(self):
        return KernelRouting(self.top_k, self.num_experts, self.weight)

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        logits = F.linear(hidden, self.weight)
        routing_logits = logits
        if self.training and self.noise:
            noise_std = F.softplus(F.linear(hidden, self.noise_weight))
            routing_logits = logits + data_parallel_draw(logits) * noise_std
        indices = routing_logits.topk(self.top_k, dim=-1).indices
        gates = chosen_gates(routing_logits, indices)
        probs = self.all_probs(routing_logits)
        self.set_losses(lambda: self.balancing_loss(probs, indices, mask), logits, mask)
        if self.record_statistics:
            self.record(indices, probs, mask)
        return Routing(indices=indices, gates=gates, probs=probs, logits=logits)
