"""Expert-choice routing (Zhou et al. 2022) made causal at inference, docs/design.md section 2."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import RouterBase, in_backward_pass
from .losses import Routing
from .registry import register_router

THRESHOLD_RATE = 0.1  # each training pass moves a threshold 10% of the way to that pass's selection cut-off


@register_router("expert_choice")
class ExpertChoiceRouter(RouterBase):
    """Experts pick tokens while training; per-expert thresholds learned from those picks route at inference.

    ``p = softmax(h W_g)`` over the E experts. **Training:** expert i takes the ``C = ceil(c * T * k / E)``
    non-padding tokens of the pass with the largest ``p_i`` (``T`` tokens, ``k = top_k``, ``c =
    capacity_factor`` or 1), so a token gets between 0 and E experts, k on average, and every expert the
    same load (no auxiliary loss is needed: ``aux_loss`` is 0). The gate of a chosen (token, expert) is
    ``p_i``, not renormalised, as in the paper. Choosing among the tokens of the whole batch sees the future,
    which is why inference does not do it: after each training pass (outside a backward recomputation) the
    threshold ``tau_i`` moves toward that pass's cut-off, the C-th largest ``p_i``:
    ``tau_i += THRESHOLD_RATE * (cut_i - tau_i)``. **Eval:** token t uses expert i iff ``p_ti >= tau_i``, a
    per-token rule (causal) that keeps each expert's share of tokens near the one it had in training.

    ``tau`` is a non-trainable ``nn.Parameter`` (saved with the adapter, skipped by the optimiser) that starts
    at 0: an untrained router's eval pass uses every expert (the dense soft mixture). ``Routing.indices``
    lists all E experts for every token and ``gates`` is zero where an expert was not chosen, so ``top_k``
    (the average number of experts per token) is not the number of columns here.
    """

    per_expert_parameters = ("weight", "thresholds")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, capacity_factor: Optional[float] = None):
        super().__init__(num_experts, top_k)
        self.capacity_factor = 1.0 if capacity_factor is None else float(capacity_factor)
        self.weight = self.gate_weight(hidden_size, num_experts)
        self.thresholds = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)

    @property
    def min_experts(self) -> int:
        return 1  # experts pick tokens: one expert still works

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config) -> "ExpertChoiceRouter":
        return cls(hidden_size, num_experts, config.top_k, capacity_factor=config.capacity_factor)

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        logits = F.linear(hidden, self.weight)
        probs = torch.softmax(logits, dim=-1)
        if self.training:
            chosen = self.expert_choice(probs, mask)
        else:
            chosen = probs >= self.thresholds.detach().float()
        gates = probs * chosen.to(probs.dtype)
        indices = torch.arange(self.num_experts, device=logits.device).expand(logits.shape[0], -1)
        self.set_losses(lambda: logits.new_zeros(()), logits, mask)
        if self.record_statistics:
            self.record_chosen(chosen, probs, mask)
        return Routing(indices=indices, gates=gates, probs=probs if self.need_probs() else None, logits=logits)

    def capacity(self, tokens: int) -> int:
        return min(tokens, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))

    def expert_choice(self, probs: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[N, E] bool: each expert's ``capacity`` highest-scoring non-padding tokens (and the threshold update)."""
        scores = probs.detach()
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), -1.0)  # below every probability: never chosen
        tokens = int(mask.sum()) if mask is not None else probs.shape[0]
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if tokens == 0:
            return chosen
        top = scores.topk(self.capacity(tokens), dim=0)  # [C, E]
        chosen.scatter_(0, top.indices, True)
        if not in_backward_pass():
            with torch.no_grad():
                self.thresholds.add_(THRESHOLD_RATE * (top.values[-1] - self.thresholds))
        return chosen
