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
    counts = F.one_hot(indices, num_experts).to(probs.dtype).sum(dim=(0, 1))  # assignments per expert
    slots = torch.tensor([float(indices.numel())], dtype=probs.dtype, device=probs.device)
    counts, slots = global_sums(counts.detach(), slots)  # every rank takes part, even with no tokens here
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return num_experts * torch.sum(counts / slots.clamp_min(1) * probs.mean(dim=0))


def global_sums(*tensors: torch.Tensor):
    """Sums over every data-parallel rank (when torch.distributed runs with several), else the tensors.

    Why: the expert fractions ``f_i`` must be those of the whole global batch, as Megatron and DeepSpeed-MoE
    compute them, or N ranks would balance N half-batches instead of the batch. With global ``f`` (no
    gradient) and each rank's own mean probabilities ``P``, the mean of the ranks' losses is the loss of the
    whole batch and DDP's averaged gradient is its gradient (equal shards)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensors
    reduced = []
    for t in tensors:
        t = t.clone()
        dist.all_reduce(t)
        reduced.append(t)
    return tuple(reduced)


def gate_matrix(indices: torch.Tensor, gates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E] matrix holding each token's k gates at its chosen experts and zero elsewhere (a ``Routing``'s
    ``indices`` and ``gates`` made dense: what the expert banks mix with, and routers' inference gates)."""
    dense = gates.new_zeros(indices.shape[0], num_experts)
    return dense.scatter(1, indices, gates)


def data_parallel_draw(like: torch.Tensor, draw=torch.randn) -> torch.Tensor:
    """Random numbers shaped like ``like`` ([N, ...], this rank's N tokens; ``draw``: ``torch.randn`` or
    ``torch.rand``): this rank's slice of one draw for the whole data-parallel batch of equal shards.

    Why: data-parallel ranks are seeded alike, so a local draw would give every rank the same noise
    for different tokens, and N ranks would not draw what one process draws for the concatenated batch. Drawn
    this way, router noise keeps data-parallel training equal to single-process training (rank r holds rows
    ``r*N .. (r+1)*N`` of the global batch, as ``training.schedule.block_rows`` deals them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return draw(like.shape, dtype=like.dtype, device=like.device)
    world, rank, n = dist.get_world_size(), dist.get_rank(), like.shape[0]
    return draw((world * n, *like.shape[1:]), dtype=like.dtype, device=like.device)[rank * n:(rank + 1) * n]


def router_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t (logsumexp_j z_tj)^2``: keeps router logits small and stable."""
    if mask is not None:
        logits = logits[mask]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
