"""The router losses of docs/design.md section 2, and the routing decision every router returns.

Both losses take a padding mask so that padding tokens count in neither; both run in float32 (the
routers hand them float32 logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """One routing decision for N tokens."""

    indices: torch.Tensor  # [N, k] chosen experts, distinct within a row
    gates: torch.Tensor  # [N, k] float32, rows sum to 1 (switch: the single p_i in (0, 1], 0 over capacity)
    probs: Optional[torch.Tensor]  # [N, E] float32 softmax over all E logits; None on the inference path
    logits: torch.Tensor  # [N, E] float32, clean logits h @ W_g (no noise)


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss ``E * sum_i f_i * P_i``; exactly 1 for uniform routing.

    ``f_i``: fraction of the T*k (token, slot) assignments sent to expert i; ``P_i``: mean router
    probability of expert i. Padding tokens (mask == False) count in neither.
    """
    if mask is not None:
        probs, indices = probs[mask], indices[mask]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    assignments = F.one_hot(indices, num_experts).to(probs.dtype)  # [T, k, E]
    fraction = assignments.sum(dim=(0, 1)) / (indices.shape[0] * indices.shape[1])
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t (logsumexp_j z_tj)^2``: keeps router logits small and stable."""
    if mask is not None:
        logits = logits[mask]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
