"""Routing by the nearest prototype: how a mixed adapter picks the skill for a text, docs/design.md section 2.

A mix (``lifecycle.mix``) puts adapters trained apart side by side as the experts of one layer. Each recorded what
its training text looks like to that layer, the mean router input (its prototype, ``integration.prototypes``). A
sequence goes to the expert whose prototype is nearest to its causal prefix mean: mixing needs no data at all, and
the prototypes can be calibrated later (they are the router's trainable rows).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..decode_kernel import KernelRouting
from .base import RouterBase, chosen_gates
from .losses import Routing, gate_matrix
from .prefix_state import PrefixMeanRouting
from .registry import register_router


@register_router("prototype")
class PrototypeRouter(PrefixMeanRouting, RouterBase):
    """Token t is routed by its sequence's prefix mean ``m_t`` (as ``sequence_aux_free``: causal, carried through
    decoding by the ``PrefixState``) to the experts whose prototypes ``p_i`` (rows of ``weight`` [E, d]) are nearest:

    ``d_i = ||m_t - p_i||^2 / d``, ``z_i = -d_i / T``, ``chosen = top-k(z)``, ``g = softmax(z[chosen])`` (top-1: a
    straight-through gate of value 1, ``base.chosen_gates``), ``T = prototype_temperature``.

    With a null expert, ``z_null = -(null_distance + null_slope / n_t) / T``, ``n_t`` the prefix's length: the null
    wins where every prototype is farther than that threshold (two trainable scalars per layer, in the units of
    ``d_i``), so text unlike every expert's training text keeps the base model's behaviour. The threshold shrinks
    as the prefix grows because a prefix mean does: the mean of n tokens of an expert's own kind of text lies about
    ``spread + spread_slope / n`` from its prototype (``integration.prototypes``), and a mix sets the threshold to D
    times that. No balancing (the prototypes, not the load, decide): ``aux_loss`` and ``z_loss`` are 0. The
    prototypes start at zero, the spreads at one and their slopes at zero; a mix sets them. ``spread`` and
    ``spread_slope`` are non-trainable ``nn.Parameter`` (as aux_free's bias) so that the adapter file keeps them.
    """

    per_expert_parameters = ()
    # per real expert: its prototype, and how far its training sequences' prefix means of length n lie from it,
    # ``spread + spread_slope / n`` (kept, not trained: a later mix sets the null's threshold from every expert's);
    # the null's threshold is ``null_distance + null_slope / n``
    real_expert_parameters = ("weight", "spread", "spread_slope")

    def __init__(self, hidden_size: int, experts: int, top_k: int, temperature: float = 1.0, null: bool = False):
        super().__init__(experts + int(null), top_k)
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.zeros(experts, hidden_size, dtype=torch.float32))
        self.spread = nn.Parameter(torch.ones(experts, dtype=torch.float32), requires_grad=False)
        self.spread_slope = nn.Parameter(torch.zeros(experts, dtype=torch.float32), requires_grad=False)
        self.null_distance = nn.Parameter(torch.ones(1, dtype=torch.float32)) if null else None
        self.null_slope = nn.Parameter(torch.zeros(1, dtype=torch.float32)) if null else None

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "PrototypeRouter":
        null = bool(config.null_expert)  # ``num_experts`` counts the null's choice (``RouterBase.build``)
        return cls(hidden_size, num_experts - int(null), config.top_k, config.prototype_temperature, null)

    def init_gate(self, scale: float) -> None:
        """No draw: the prototypes come from the mixed adapters."""

    def logits(self, means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[N, E] ``-d_i / T`` (and the null's last) of the prefix means [N, d] of ``counts`` [N] tokens, by
        ``||m||^2 - 2 m.p + ||p||^2`` (no [N, E, d] tensor) after moving the origin to the prototypes' mean: a Llama's
        router inputs share a few very large dimensions, whose squares would otherwise swamp the differences in
        float32 (the distances do not depend on the origin)."""
        prototypes = self.weight.float()
        centre = prototypes.mean(dim=0).detach()
        means, prototypes = means - centre, prototypes - centre
        squared = (means.pow(2).sum(-1, keepdim=True) - 2 * means @ prototypes.T + prototypes.pow(2).sum(-1))
        logits = -squared.clamp_min(0.0) / (means.shape[-1] * self.temperature)
        if self.null_distance is not None:
            # -(D + S / n) / T in the kernel's order of float32 operations: the same null logit, bit for bit
            null = -self.null_distance.float() / self.temperature \
                + (-self.null_slope.float() / self.temperature) / counts.float().clamp_min(1.0)
            logits = torch.cat([logits, null.view(-1, 1)], dim=1)
        return logits

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        indices = logits.topk(self.top_k, dim=-1).indices
        return gate_matrix(indices, torch.softmax(logits.gather(1, indices), dim=-1), self.num_experts)

    def kernel_routing(self) -> KernelRouting:
        """``logits`` as the kernel's ``prototype_logits`` computes them, from the same centred prototypes."""
        prototypes = self.weight.detach().float()
        centre = prototypes.mean(dim=0)
        centred = prototypes - centre
        null = (0.0, 0.0) if self.null_distance is None else \
            tuple(float(-p.detach().float() / self.temperature) for p in (self.null_distance, self.null_slope))
        return KernelRouting(self.top_k, self.num_experts, centred, logits="prototype", prefix_mean=True,
                             centre=centre, row_norms=centred.pow(2).sum(-1),
                             divisor=self.weight.shape[1] * self.temperature, null_logit=null[0], null_slope=null[1])

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        counts = self.pass_counts  # None: each row is a token routed alone, a prefix of one
        counts = counts if counts is not None else hidden.new_ones(hidden.shape[0])
        logits = self.logits(hidden, counts)
        indices = logits.topk(self.top_k, dim=-1).indices
        gates = chosen_gates(logits, indices)
        probs = self.all_probs(logits)
        if self.need_losses():
            self.aux_loss = self.z_loss = logits.new_zeros(())
            self.extra_losses = {name: loss(logits, mask, self.real_experts) for name, loss in self.loss_terms.items()}
        else:
            self.aux_loss = self.z_loss = None
            self.extra_losses = {}
        if self.record_statistics:
            self.record(indices, probs, mask)
        return Routing(indices=indices, gates=gates, probs=probs, logits=logits)
