"""Oracle routing by the domain label: the bound every learned router is measured against, docs/design.md
section 2."""

from __future__ import annotations

from typing import Optional

import torch

from ...errors import ConfigError
from .base import RouterBase
from .losses import Routing
from .registry import register_router

NO_LABELS = ("--router-type oracle routes each sequence by its domain label, and this forward pass has none: run it "
             "inside `with llama_expert.domain_labels(model, labels):` (one domain index per sequence), or train and "
             "benchmark with one --dataset source per domain.")


@register_router("oracle")
class OracleRouter(RouterBase):
    """Every token of a domain-``d`` sequence uses expert group ``d``: with ``D`` domains (``oracle_domains``) and
    ``E`` experts in the layer, experts ``d*E//D .. (d+1)*E//D - 1``, each with gate ``1/|group d|`` (hard routing,
    gates sum to 1). Why: with the same experts and budget as a learned router, this is how well routing by domain
    can do, the yardstick for a router's domain specialisation (its domain-expert NMI is 1 when every group is one
    expert, ``E = D``).

    The labels come from the pass context (``integration.surgery.domain_labels``; the trainer, perplexity and
    the benchmark pass each window's label); a pass without them is refused. No router matrix and nothing to
    learn: ``aux_loss`` and ``z_loss`` are 0, ``Routing.logits`` are zeros, ``indices`` list all ``E`` experts
    with gate 0 outside the group (as expert choice does), and ``top_k`` is the largest group, ``ceil(E/D)``.
    """

    sequence_level = True
    per_expert_parameters = ()

    def __init__(self, num_experts: int, num_domains: int):
        if num_domains > num_experts:
            raise ConfigError(f"--router-type oracle gives each of --oracle-domains {num_domains} domains its own "
                              f"experts, but a layer has only {num_experts}: raise --num-experts (with "
                              f"--expert-allocation uniform) or lower --oracle-domains.")
        super().__init__(num_experts, top_k=-(-num_experts // num_domains))
        self.num_domains = num_domains

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "OracleRouter":
        if config.null_expert:  # the label decides the group: there is no choice for a null expert to be
            raise ConfigError("--router-type oracle routes by the domain label and never chooses a null expert: "
                              "drop --null-expert.")
        return cls(num_experts, config.oracle_domains)

    @property
    def min_experts(self) -> int:
        return self.num_domains  # one expert per domain at least

    def init_gate(self, scale: float) -> None:
        """No router matrix to draw."""

    def select_experts(self, index: torch.Tensor):
        transfers = super().select_experts(index)
        self.top_k = -(-self.num_experts // self.num_domains)
        return transfers

    def group_gates(self, device) -> torch.Tensor:
        """[D, E]: row d holds ``1/|group d|`` at the experts of group d, 0 elsewhere."""
        experts, domains = torch.arange(self.num_experts), torch.arange(self.num_domains)
        low = (domains * self.num_experts // self.num_domains).unsqueeze(1)
        high = ((domains + 1) * self.num_experts // self.num_domains).unsqueeze(1)
        member = ((experts >= low) & (experts < high)).float()
        return (member / member.sum(dim=1, keepdim=True)).to(device)

    def route_sequences(self, hidden: torch.Tensor, context) -> Routing:
        batch, length = hidden.shape[:2] if hidden.dim() == 3 else (1, hidden.shape[0])
        labels = self.sequence_labels(context.domain_labels if context is not None else None, batch)
        mask = context.for_hidden(hidden) if context is not None else None
        return self.route_labels(labels.to(hidden.device).repeat_interleave(length), mask)

    def sequence_labels(self, labels, batch: int) -> torch.Tensor:
        """[B] long: the pass's labels checked (one per sequence, within 0..D-1); an int labels every sequence."""
        if labels is None:
            raise ConfigError(NO_LABELS)
        labels = torch.as_tensor(labels)
        if labels.dim() == 0:
            labels = labels.expand(batch)
        if labels.dim() != 1 or labels.shape[0] != batch or labels.dtype.is_floating_point:
            raise ConfigError(f"domain_labels got {tuple(labels.shape)} {labels.dtype} labels for a batch of {batch} "
                              f"sequences; give one integer domain index per sequence.")
        if torch.compiler.is_compiling():  # reading the labels back would stop a CUDA graph: checked when eager
            return labels.long()
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_domains:
            raise ConfigError(f"domain label {low if low < 0 else high} is outside 0..{self.num_domains - 1} "
                              f"(--oracle-domains {self.num_domains}); train with --oracle-domains set to the number "
                              f"of --dataset sources.")
        return labels.long()

    def route_labels(self, labels: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        """Routing of N tokens whose sequences carry domain ``labels`` [N]."""
        gates = self.group_gates(labels.device)[labels]  # [N, E]
        indices = torch.arange(self.num_experts, device=labels.device).expand(labels.shape[0], -1)
        self.aux_loss = self.z_loss = gates.new_zeros(()) if self.need_losses() else None
        if self.record_statistics:
            self.record_chosen(gates > 0, gates, mask)
        return Routing(indices=indices, gates=gates, probs=gates if self.need_probs() else None,
                       logits=torch.zeros_like(gates))

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        raise ConfigError(NO_LABELS)  # a flat batch of tokens has no sequences, hence no labels
