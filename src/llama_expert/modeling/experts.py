"""The expert banks: all experts of one layer as stacked tensors, evaluated with batched matmuls.

Why dense-over-experts and not gather/scatter (MegaBlocks): at rank 16 an expert costs ``E*r*d``
multiply-adds per token, under 2% of the frozen MLP's ``3*d*I``. Computing every expert's small output
and mixing it with a gate matrix that is zero outside each token's top k is exactly the top-k result,
takes two or three matmuls with no Python loop and no index shuffling, and is faster than dispatch at
these sizes on both CPU and GPU (docs/design.md section 3).

Banks are registered by name (``ExpertConfig.expert_type``) and built with ``from_config``.
``lora_scaling`` is the fixed LoRA factor ``lora_alpha / lora_r``; the learnable per-layer factor lives
in the adapter (``MoEAdapter.residual_scale``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

EXPERT_BANKS = Registry("expert bank", "expert_type")
register_expert_bank = EXPERT_BANKS.register


def gate_matrix(indices: torch.Tensor, gates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E] matrix holding each token's k gates at its chosen experts and zero elsewhere."""
    dense = gates.new_zeros(indices.shape[0], num_experts)
    return dense.scatter(1, indices, gates)


def lora_scaling(config) -> float:
    """The fixed LoRA factor ``lora_alpha / lora_r`` applied to every bank's output."""
    return config.lora_alpha / config.lora_r


@register_expert_bank("shared_core")
class SharedCoreExperts(nn.Module):
    """Experts that share ``A: d->r`` and ``B: r->d``; expert i owns a core ``r->e->r``.

    ``MoE(h) = s * B( z + sum_i g_i * W2_i silu(W1_i z) )``, ``z = A dropout(h)``, ``s = lora_alpha/r``,
    ``e = expert_hidden_size``. The identity path ``z`` makes the bank at least as expressive as one
    rank-r LoRA; the routed cores add token-dependent nonlinear corrections. ``B`` starts at zero, so the
    bank outputs exactly zero at step 0.
    """

    def __init__(self, hidden_size: int, num_experts: int, rank: int, expert_hidden_size: int,
                 lora_scaling: float, dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.lora_scaling = lora_scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.Parameter(torch.empty(rank, hidden_size))  # A
        self.up = nn.Parameter(torch.zeros(hidden_size, rank))  # B, zero: the adapter starts as a no-op
        self.core_in = nn.Parameter(torch.empty(num_experts, rank, expert_hidden_size))  # W1_i
        self.core_out = nn.Parameter(torch.empty(num_experts, expert_hidden_size, rank))  # W2_i
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.normal_(self.core_in, std=rank ** -0.5)
        nn.init.normal_(self.core_out, std=expert_hidden_size ** -0.5)

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "SharedCoreExperts":
        return cls(hidden_size, num_experts, config.lora_r, config.expert_hidden_size or config.lora_r,
                   lora_scaling(config), config.lora_dropout)

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(hidden) if self.training else hidden, self.down)  # [N, r]
        inner = F.silu(torch.matmul(z, self.core_in))  # [E, N, e]: every expert's core, one batched matmul
        weights = gate_matrix(indices, gates, self.num_experts).to(z.dtype)  # [N, E]
        routed = torch.matmul(weights.t().unsqueeze(-1) * inner, self.core_out).sum(0)  # gate, W2_i, sum
        return F.linear(z + routed, self.up) * self.lora_scaling


@register_expert_bank("shared_down")
class SharedDownExperts(nn.Module):
    """HydraLoRA-like experts: shared ``A: d->r``, expert i owns ``B_i: r->d`` (zero-initialised).

    ``MoE(h) = s * sum_i g_i B_i A dropout(h)``, computed as one matmul of the gate-scaled copies of
    ``z`` ([N, E*r]) with the stacked ``B`` ([E*r, d]).
    """

    def __init__(self, hidden_size: int, num_experts: int, rank: int, lora_scaling: float, dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.lora_scaling = lora_scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.Parameter(torch.empty(rank, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, rank, hidden_size))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "SharedDownExperts":
        return cls(hidden_size, num_experts, config.lora_r, lora_scaling(config), config.lora_dropout)

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(hidden) if self.training else hidden, self.down)  # [N, r]
        weights = gate_matrix(indices, gates, self.num_experts).to(z.dtype)  # [N, E]
        scaled = (weights.unsqueeze(-1) * z.unsqueeze(1)).reshape(z.shape[0], -1)  # [N, E*r]
        return scaled @ self.up.reshape(-1, self.up.shape[-1]) * self.lora_scaling
