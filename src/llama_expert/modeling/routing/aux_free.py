"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024), docs/design.md section 2."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..decode_kernel import KernelRouting
from .base import RouterBase, chosen_gates, in_backward_pass
from .losses import Routing, gate_matrix
from .registry import register_router


@register_router("aux_free")
class AuxFreeRouter(RouterBase):
    """Top-k on ``z + b``, gates from the unbiased ``z``: ``z = h W_g``, ``chosen = top-k(z + b)``,
    ``g = softmax(z[chosen])`` (top-1: a straight-through gate of value 1, ``base.chosen_gates``).

    ``b`` [E] is a per-expert bias that only steers the choice. It is a non-trainable ``nn.Parameter``
    (``requires_grad=False``) so that it is saved and loaded with the adapter like every other tensor. After
    each training-mode pass it moves toward balance, under no_grad:
    ``b_i += gamma * sign(mean_j load_j - load_i)``, ``load_i`` = assignments to expert i among the non-padding
    tokens of the pass (of every data-parallel rank: ``global_sums``; with ``balance_window``, over about that many
    sequences: ``RouterBase.balance_load``), ``gamma = aux_free_bias_rate``. In eval it stays fixed. A token's
    routing depends on its own hidden state and on ``b`` (set by earlier batches), so it is causal.

    With a null expert the null's bias stays 0 and the real experts' steps are centred (their mean bias stays
    where it was): the bias balances the experts among themselves and never pushes tokens to or from the null.

    No auxiliary loss: ``aux_loss`` is a zero (the bias does the balancing); ``z_loss`` as usual. With gradient
    checkpointing the recomputed forward skips the update but sees the bias already updated by this pass.
    """

    per_expert_parameters = ("weight", "bias")
    has_inference_gates = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, bias_rate: float = 1e-3):
        super().__init__(num_experts, top_k)
        self.bias_rate = float(bias_rate)
        self.weight = self.gate_weight(hidden_size, num_experts)
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "AuxFreeRouter":
        return cls(hidden_size, num_experts, config.top_k, bias_rate=config.aux_free_bias_rate)

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        indices = (logits + self.bias).topk(self.top_k, dim=-1).indices  # under no_grad: no detach needed
        return gate_matrix(indices, torch.softmax(logits.gather(1, indices), dim=-1), self.num_experts)

    def kernel_routing(self):
        return KernelRouting(self.top_k, self.num_experts, self.weight, self.bias)

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        logits = F.linear(hidden, self.weight)
        indices = (logits + self.bias.detach().float()).topk(self.top_k, dim=-1).indices
        gates = chosen_gates(logits, indices)
        probs = self.all_probs(logits)
        self.set_losses(lambda: logits.new_zeros(()), logits, mask)
        if self.record_statistics:
            self.record(indices, probs, mask)
        if self.training and self.bias_rate > 0 and not in_backward_pass():
            self.update_bias(indices, mask)
        return Routing(indices=indices, gates=gates, probs=probs, logits=logits)

    @torch.no_grad()
    def update_bias(self, indices: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        load = self.balance_load(indices, mask, self.bias.dtype)  # the whole data-parallel batch's: ranks agree
        step = torch.sign(load.mean() - load)  # no load at all: every step is 0 (no branch, so no host read)
        if self.null_choices:
            step = step - step.mean()  # the real experts move against each other, never against the null
        self.bias[:self.real_experts].add_(self.bias_rate * step)
