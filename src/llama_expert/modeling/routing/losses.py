"""The router losses of docs/design.md section 2, and the routing decision every router returns.

Every loss takes a padding mask so that padding tokens count in none; all run in float32 (the routers hand
them float32 logits). Losses beyond load balancing and the z-loss are registered (``register_router_loss``) with
the ``ExpertConfig`` field of their coefficient: a router computes one only when its coefficient is above 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch


@dataclass
class Routing:
    """One routing decision for N tokens."""

    indices: torch.Tensor  # [N, k] chosen experts, distinct within a row
    gates: torch.Tensor  # [N, k] float32, rows sum to 1 (switch: the single p_i in (0, 1], 0 over capacity)
    probs: Optional[torch.Tensor]  # [N, E] float32 softmax over all E logits; None on the inference path
    logits: torch.Tensor  # [N, E] float32, clean logits h @ W_g (no noise)


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                        mask: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss ``E * sum_i f_i * P_i``; exactly 1 for uniform routing.

    ``f_i``: fraction of the (token, slot) assignments to the ``E = num_experts`` balanced experts sent to expert
    i; ``P_i``: mean router probability of expert i. Padding tokens (mask == False) count in neither. Columns of
    ``probs`` beyond ``num_experts`` (a null expert's) take no part: ``P`` is renormalised over the balanced
    experts, so the loss neither pushes tokens to the null nor away from it. ``counts`` [E]: the assignments to
    balance (``RouterBase.balance_load``: summed over the ranks, over a window); default this pass's, summed over
    the data-parallel ranks.
    """
    if mask is not None:
        probs, indices = probs[mask], indices[mask]
    if counts is None:
        (counts,) = global_load(indices, None, probs.shape[-1], num_experts, probs.dtype)
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    if probs.shape[-1] > num_experts:
        probs = probs[:, :num_experts] / probs[:, :num_experts].sum(dim=-1, keepdim=True)
    return num_experts * torch.sum(counts / counts.sum().clamp_min(1) * probs.mean(dim=0))


def global_load(indices: torch.Tensor, mask: Optional[torch.Tensor], num_choices: int, num_experts: int,
                dtype: torch.dtype, *extra: float) -> Tuple[torch.Tensor, ...]:
    """(assignments per balanced expert [num_experts], *extra) over every data-parallel rank, in one all-reduce.

    ``indices`` [N, k] choose among ``num_choices``; the first ``num_experts`` are balanced (a null expert after them
    is not counted); padding (mask == False) is not counted. Every rank takes part, even with no tokens.
    """
    flat = indices.reshape(-1)
    # counted with a static shape (a scatter, not bincount or a boolean index): a compiled training step keeps one graph
    weights = torch.ones_like(flat) if mask is None else mask.to(flat.dtype).repeat_interleave(indices.shape[1])
    counts = flat.new_zeros(num_choices).scatter_add_(0, flat, weights)[:num_experts].to(dtype)
    (total,) = global_sums(torch.cat([counts, counts.new_tensor(extra)]))
    return (total[:num_experts], *total[num_experts:])


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
    ``indices`` and ``gates`` made dense: what the expert banks mix with, and routers' inference gates). An expert
    listed twice in a row gets the sum of its gates (``RouterBase.bank_routing`` lists a null expert's slot as
    expert 0 with gate 0)."""
    dense = gates.new_zeros(indices.shape[0], num_experts)
    return dense.scatter_add(1, indices, gates)


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


# name -> (the ExpertConfig field of its coefficient, loss(logits [N, C], mask, num_experts) -> scalar)
ROUTER_LOSSES: Dict[str, Tuple[str, Callable]] = {}


def register_router_loss(name: str, coefficient: str):
    """Register a router loss beyond L_aux and L_z, weighted by ``ExpertConfig.<coefficient>`` (routers compute it
    only when that is above 0; ``integration.surgery.weighted_router_loss`` adds it, logged as ``name``)."""
    def add(loss: Callable) -> Callable:
        if name in ROUTER_LOSSES:
            raise ValueError(f"a router loss named {name!r} is registered already")
        ROUTER_LOSSES[name] = (coefficient, loss)
        return loss
    return add


@register_router_loss("mi_loss", "router_mi_loss_coef")
def mutual_information_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                            num_experts: Optional[int] = None) -> torch.Tensor:
    """``-(H(mean_t p_t) - mean_t H(p_t))``: minimising it maximises the mutual information between token and
    expert over the pass's tokens, i.e. confident routing per token (low ``H(p_t)``) that still uses every expert
    (high ``H`` of the mean). ``p_t`` is the softmax of the first ``num_experts`` logits (a null expert's is left
    out, as in load balancing). Over this rank's tokens only: the batch mean inside ``H`` is not reduced over ranks.
    """
    if mask is not None:
        logits = logits[mask]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    log_p = torch.log_softmax(logits[:, :num_experts], dim=-1)
    p = log_p.exp()
    token_entropy = -(p * log_p).sum(dim=-1).mean()
    mean = p.mean(dim=0)
    return token_entropy + (mean * mean.clamp_min(1e-12).log()).sum()


def router_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t (logsumexp_j z_tj)^2``: keeps router logits small and stable."""
    if mask is not None:
        logits = logits[mask]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
