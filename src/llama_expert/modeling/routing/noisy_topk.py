"""Noisy top-k gating (Shazeer et al. 2017), docs/design.md section 2.

The router always runs in float32: bf16 logits tie and flip top-k choices between runs, and the
z-loss squares a logsumexp that overflows half precision quickly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .losses import Routing, load_balancing_loss, router_z_loss
from .registry import register_router


@register_router("noisy_top_k")
class NoisyTopKGating(nn.Module):
    """Router ``z = h W_g``; in training adds ``eps * softplus(h W_noise)``; keeps the top k.

    After each forward the module holds the losses of that pass (``aux_loss``, ``z_loss``; None after
    an eval-mode pass under ``torch.no_grad``, where nothing could use them). With ``record_statistics``
    on, it also adds its choices to ``expert_counts`` (and router entropy to ``entropy_sum``). Decoding
    runs this module once per layer per token, so the inference path does only logits, top-k and gates.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, noise: bool = True):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} > num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise = noise
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32)) \
            if noise else None
        nn.init.normal_(self.weight, std=hidden_size ** -0.5 * 0.1)
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.record_statistics = False  # switched on by evaluation.routing_health while it measures expert usage
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64), persistent=False)

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "NoisyTopKGating":
        return cls(hidden_size, num_experts, config.top_k, noise=config.router_noise)

    def reset_statistics(self) -> None:
        self.expert_counts.zero_()
        self.entropy_sum.zero_()
        self.tokens_seen.zero_()

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Routing:
        if torch.is_autocast_enabled(hidden.device.type):
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                return self._route(hidden.float(), mask)
        return self._route(hidden.float(), mask)

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        logits = F.linear(hidden, self.weight)
        routing_logits = logits
        if self.training and self.noise:
            noise_std = F.softplus(F.linear(hidden, self.noise_weight))
            routing_logits = logits + torch.randn_like(logits) * noise_std
        top_logits, indices = routing_logits.topk(self.top_k, dim=-1)
        gates = torch.softmax(top_logits, dim=-1)
        need_losses = self.training or torch.is_grad_enabled()  # inference under no_grad needs none
        probs = torch.softmax(routing_logits, dim=-1) if need_losses or self.record_statistics else None
        if need_losses:
            self.aux_loss = load_balancing_loss(probs, indices, self.num_experts, mask)
            self.z_loss = router_z_loss(logits, mask)
        else:
            self.aux_loss = self.z_loss = None
        if self.record_statistics:
            self._record(indices, probs, mask)
        return Routing(indices=indices, gates=gates, probs=probs, logits=logits)

    @torch.no_grad()
    def _record(self, indices: torch.Tensor, probs: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        if mask is not None:
            indices, probs = indices[mask], probs[mask]
        self.expert_counts += torch.bincount(indices.reshape(-1), minlength=self.num_experts).double()
        self.entropy_sum += torch.special.entr(probs).sum().double()
        self.tokens_seen += indices.shape[0]
