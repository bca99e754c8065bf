"""``lora_experts``: fewer, larger experts that each own their ``A_i`` and ``B_i`` (docs/design.md section 3).

Why: in ``shared_core`` (and ``shared_down``) every expert reads the same ``r``-dimensional projection ``A h``, so
experts differ only inside one shared subspace; routing then barely changes the loss and the router gets almost
no signal. Here expert ``i`` is a LoRA of its own, ``B_i A_i``, so two experts can act on different directions of
``h``. For the same parameters there are fewer of them (3-4 per layer of rank ``expert_rank`` rather than 8 cores).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ExpertBank, lora_scaling, register_bank
from .routing.losses import gate_matrix


def expert_rank(config) -> int:
    """``expert_rank``, else ``max(1, lora_r // num_experts)``: the routed experts together have rank about ``lora_r``
    in the widest layer."""
    return config.expert_rank or max(1, config.lora_r // config.num_experts)


@register_bank("lora_experts")
class LoRAExperts(ExpertBank):
    """Expert ``i`` owns ``A_i: d -> r_e`` and ``B_i: r_e -> d``; an optional shared expert ``B_s A_s`` is always on.

    ``MoE(h) = s * ( B_s A_s x + sum_i g_i B_i A_i x )``, ``x = dropout(h)``, ``s = lora_alpha / lora_r`` (the fixed
    factor of every bank), ``r_e = expert_rank``, ``r_s = shared_expert_rank`` (0: no shared expert). Computed dense
    over experts, as the other banks: one matmul of ``x`` with every ``A`` stacked (``[r_s + E*r_e, d]``), the
    routed blocks scaled by their gates, one matmul with every ``B`` stacked. ``A`` starts Kaiming-uniform (LoRA's
    ``A``), every ``B`` at zero: the bank outputs exactly zero at step 0. Only ``expert_init="zero"``: the ``A_i``
    are random and distinct already.
    """

    expert_init_hint = " Its experts' A_i are random and distinct already; use --expert-init zero."
    per_expert_parameters = ("down", "up")

    def __init__(self, hidden_size: int, num_experts: int, rank: int, shared_rank: int, lora_scaling: float,
                 dropout: float = 0.0):
        super().__init__()
        self.num_experts, self.rank = num_experts, rank
        self.lora_scaling = lora_scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # every A (A_i and A_s) starts as LoRA's does, kaiming_uniform_(a=sqrt(5)) of a [r, d] matrix: U(+-1/sqrt(d));
        # drawn with uniform_ because kaiming would take the fan-in of the stacked [E, r_e, d] tensor as r_e * d
        bound = hidden_size ** -0.5
        self.down = nn.Parameter(torch.empty(num_experts, rank, hidden_size).uniform_(-bound, bound))  # A_i
        self.up = nn.Parameter(torch.zeros(num_experts, rank, hidden_size))  # B_i, stored [r_e, d]; zero: a no-op
        self.shared_down: Optional[nn.Parameter] = None
        self.shared_up: Optional[nn.Parameter] = None
        if shared_rank > 0:
            self.shared_down = nn.Parameter(torch.empty(shared_rank, hidden_size).uniform_(-bound, bound))  # A_s
            self.shared_up = nn.Parameter(torch.zeros(shared_rank, hidden_size))  # B_s, stored [r_s, d]

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config, base_mlp=None) -> "LoRAExperts":
        return cls(hidden_size, num_experts, expert_rank(config), config.shared_expert_rank, lora_scaling(config),
                   config.lora_dropout)

    def stacked_down(self) -> torch.Tensor:
        """Every ``A`` as rows ``[A_s; A_1; ..; A_E]``: [r_s + E*r_e, d]."""
        down = self.down.reshape(-1, self.down.shape[-1])
        return down if self.shared_down is None else torch.cat([self.shared_down, down])

    def stacked_up(self) -> torch.Tensor:
        """Every ``B`` as rows, in the order of ``stacked_down``: [r_s + E*r_e, d]."""
        up = self.up.reshape(-1, self.up.shape[-1])
        return up if self.shared_up is None else torch.cat([self.shared_up, up])

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden) if self.training else hidden
        z = F.linear(x, self.stacked_down())  # [N, r_s + E*r_e]: every expert's A x
        weights = gate_matrix(indices, gates, self.num_experts).to(z.dtype)  # [N, E]
        return self.mix(z, weights) @ self.stacked_up() * self.lora_scaling

    def mix(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[z_s, g_1 z_1, .., g_E z_E]``: the shared block as it is, each routed block times its gate."""
        shared = z.shape[1] - self.num_experts * self.rank
        routed = z[:, shared:].view(z.shape[0], self.num_experts, self.rank) * weights.unsqueeze(-1)
        routed = routed.reshape(z.shape[0], -1)
        return routed if shared == 0 else torch.cat([z[:, :shared], routed], dim=1)

    def inference_state(self, residual_scale: torch.Tensor):
        """Input rows: every ``A`` stacked; state: every ``B`` stacked, times ``alpha_l * s``."""
        if self.down.dtype != torch.float32:
            return None
        with torch.no_grad():
            return self.stacked_down().detach(), self.stacked_up().detach() * (self.lora_scaling * residual_scale)

    def inference_output(self, rows: torch.Tensor, gates: torch.Tensor, state) -> torch.Tensor:
        return self.mix(rows, gates) @ state

    def kernel_form(self, residual_scale: torch.Tensor):
        """``lora_experts_delta`` (modeling/decode_kernel.c): rows ``[A_s; A_1..A_E]``, ``up`` the stacked ``B``, width
        ``r_e``; the kernel multiplies only the chosen experts' ``B_i``."""
        if self.down.dtype != torch.float32:
            return None
        rows, up = self.inference_state(residual_scale)
        return "lora_experts", rows.shape[0], self.rank, {"input_rows": rows, "up": up}
