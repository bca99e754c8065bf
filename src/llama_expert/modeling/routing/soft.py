"""Dense soft mixture (MoV / MoLoRA style), docs/design.md section 2: the reference top-k routing approaches."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..decode_kernel import KernelRouting
from .base import RouterBase
from .losses import Routing
from .registry import register_router


@register_router("soft")
class SoftRouter(RouterBase):
    """Every token uses all E experts: ``indices = [0, ..., E-1]``, ``g = softmax(h W_g)`` over all E logits.

    ``config.top_k`` is ignored; ``top_k`` on the module is E. Losses: ``aux_loss`` is the load-balancing loss
    with every expert assigned to every token, ``f_i = 1/E``, so ``L_aux = E * sum_i (1/E) P_i = 1`` whatever
    the router does (constant, no gradient to the router; kept so the loss bookkeeping is uniform); ``z_loss``
    as usual. Per token, hence causal. Costs all E experts per token.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(num_experts, top_k=num_experts)
        self.weight = self.gate_weight(hidden_size, num_experts)

    @property
    def min_experts(self) -> int:
        return 1  # routes among all experts, however many

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "SoftRouter":
        return cls(hidden_size, num_experts)

    def select_experts(self, index: torch.Tensor):
        transfers = super().select_experts(index)
        self.top_k = self.num_experts  # every choice, as before
        return transfers

    has_inference_gates = True

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def kernel_routing(self):
        return KernelRouting(self.num_experts, self.num_experts, self.weight)  # every expert, softmax over all

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        logits = F.linear(hidden, self.weight)
        gates = torch.softmax(logits, dim=-1)
        indices = torch.arange(self.num_experts, device=logits.device).expand(logits.shape[0], -1)
        probs = gates if self.need_probs() else None
        self.set_losses(lambda: self.balancing_loss(probs, indices, mask), logits, mask)
        if self.record_statistics:
            self.record(indices, probs, mask)
        return Routing(indices=indices, gates=gates, probs=probs, logits=logits)
