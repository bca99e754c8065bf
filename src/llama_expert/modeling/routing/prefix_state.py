"""PrefixState: what a sequence router carries from one forward pass of its sequences to the next (decoding).

A sequence router (``sequence_aux_free``) routes token t by the mean of its sequence's router inputs over tokens
0..t. A full forward pass has them all; a decoding step with a KV cache sees only its new token, so the earlier
tokens' sum and count must come from the passes before. They are kept here, per router (one per layer), and
travel with the KV cache of the generation (``integration.prefix_cache``), never on the model: a model serves
generation after generation, and each must start from nothing.

A pass reads ``before`` (left by the earlier passes; empty for new sequences) and writes ``after``; ``following``
is the state of the next pass. Reading never sees the pass's own writes, so routing twice in one pass (a pruning
hook, gradient checkpointing's recomputation) gives the same answer twice.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

Sums = Tuple[torch.Tensor, torch.Tensor]  # ([B, d] float32 sum of the non-padding router inputs, [B] their count)


class PrefixState:
    def __init__(self, before: Optional[Dict[object, Sums]] = None):
        self.before: Dict[object, Sums] = before or {}
        self.after: Dict[object, Sums] = {}

    def read(self, key) -> Optional[Sums]:
        """What earlier passes left for ``key`` (a router), or None: these sequences start here."""
        return self.before.get(key)

    def write(self, key, total: torch.Tensor, count: torch.Tensor) -> None:
        self.after[key] = (total.detach(), count.detach())

    def following(self) -> "PrefixState":
        """The state the next pass of these sequences starts from."""
        return PrefixState({**self.before, **self.after})

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (indices or a boolean mask) of every sum, in that order (beam search reorders its
        sequences)."""
        for sums in (self.before, self.after):
            for key, (total, count) in sums.items():
                where = index.to(total.device)
                sums[key] = (total[where], count[where])

    def repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (a batch expanded after the prompt, as the cache is)."""
        for sums in (self.before, self.after):
            for key, (total, count) in sums.items():
                sums[key] = (total.repeat_interleave(repeats, dim=0), count.repeat_interleave(repeats, dim=0))
