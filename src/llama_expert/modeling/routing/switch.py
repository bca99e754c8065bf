"""Switch Transformer routing (Fedus et al. 2021), docs/design.md section 2.

Top-1 always: ``config.top_k`` is ignored (``top_k`` is 1 on the module, so routing_health reads 1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..decode_kernel import KernelRouting
from .base import RouterBase
from .losses import Routing, data_parallel_draw, gate_matrix
from .registry import register_router


@register_router("switch")
class SwitchRouter(RouterBase):
    """Top-1 router ``z = (h * u) W_g``, ``u ~ U[1-eps, 1+eps]`` per input element in training (``u = 1`` in eval).

    The one chosen expert ``i = argmax z`` gets the gate ``p_i = softmax(z)_i``, the Switch scaling, so the
    task loss trains the router (with a constant gate 1 it would learn from the auxiliary losses only).
    Hence the gates of this router do **not** sum to 1: each row holds the single value ``p_i`` in (0, 1].

    ``capacity_factor`` (training only): expert i takes at most ``ceil(capacity_factor * T / E)`` of the T
    non-padding tokens, in flattened (batch, position) order; later tokens routed to a full expert get gate 0
    and so no expert contribution (the frozen MLP, and in ``shared_core`` the shared low-rank path, still
    apply). This makes a token's output depend on earlier tokens of the *whole batch* in training only; in eval
    no capacity applies and routing is per token, so inference stays causal.

    Losses: the load-balancing loss over the chosen experts before any capacity drop (as in Switch) and the
    z-loss of the clean logits.
    """

    def __init__(self, hidden_size: int, num_experts: int, jitter: float = 0.01,
                 capacity_factor: Optional[float] = None):
        super().__init__(num_experts, top_k=1)
        self.jitter = float(jitter)
        self.capacity_factor = capacity_factor
        self.weight = self.gate_weight(hidden_size, num_experts)

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "SwitchRouter":
        return cls(hidden_size, num_experts, jitter=config.router_jitter, capacity_factor=config.capacity_factor)

    has_inference_gates = True

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        top_logit, indices = logits.max(dim=-1, keepdim=True)  # eval: no jitter, no capacity
        gates = torch.exp(top_logit - torch.logsumexp(logits, dim=-1, keepdim=True))  # p_i, as in _route
        return gate_matrix(indices, gates, self.num_experts)

    def kernel_routing(self):
        # the top expert, gated by its probability among all
        return KernelRouting(1, self.num_experts, self.weight, normalise_all=True)

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        logits = F.linear(hidden, self.weight)
        routing_logits = logits
        if self.training and self.jitter > 0:
            noise = 1.0 - self.jitter + 2.0 * self.jitter * data_parallel_draw(hidden, torch.rand)
            routing_logits = F.linear(hidden * noise, self.weight)
        top_logit, indices = routing_logits.max(dim=-1, keepdim=True)
        gates = torch.exp(top_logit - torch.logsumexp(routing_logits, dim=-1, keepdim=True))  # p_i, [N, 1]
        if self.training and self.capacity_factor is not None:
            gates = gates * self.within_capacity(indices[:, 0], mask).unsqueeze(-1).to(gates.dtype)
        probs = self.all_probs(routing_logits)
        self.set_losses(lambda: self.balancing_loss(probs, indices, mask), logits, mask)
        if self.record_statistics:
            self.record(indices, probs, mask)
        return Routing(indices=indices, gates=gates, probs=probs, logits=logits)

    @torch.no_grad()
    def within_capacity(self, chosen: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[N] bool: the token is among the first ``capacity`` non-padding tokens of its expert (padding: True)."""
        assigned = F.one_hot(chosen, self.num_experts)  # [N, E]
        if mask is not None:
            assigned = assigned * mask.unsqueeze(-1).to(assigned.dtype)
        tokens = int(assigned.sum())
        capacity = math.ceil(self.capacity_factor * tokens / self.real_experts)  # a null expert has none to keep
        position = (assigned.cumsum(dim=0) * assigned).sum(dim=-1)  # 1-based place in its expert's queue; 0: padding
        return position <= capacity
