"""The load the balancing acts on, over a window of sequences larger than one micro-batch (docs/design.md section 2).

Why: balancing the experts' load inside each micro-batch forces every micro-batch, and so every domain in it,
through every expert; balanced over many sequences, an expert may take one domain's batches and leave another's
(Qiu et al. 2025, global-batch balancing). ``LoadWindow`` keeps an exponential moving average of the assignments
per expert: after a pass over ``n`` sequences (of every data-parallel rank) with assignment counts ``c``,

    ``S <- beta^n * S + c``,   ``beta = 1 - 1/W``   (``W = ExpertConfig.balance_window``, in sequences)

so each sequence's weight decays by ``beta`` per later sequence: about the last ``W`` sequences count. Only the
shares ``S_i / sum_j S_j`` matter (the load-balancing loss's ``f_i``; aux_free compares ``S_i`` with their mean),
so ``S`` needs no bias correction. ``W = 0`` (the default) returns ``c`` itself: each micro-batch alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class LoadWindow(nn.Module):
    """``S`` [E] (float64) as a non-persistent buffer: it follows the router's device but stays out of the adapter
    file (inference never reads it); training checkpoints carry it (``training/balance_window.py``)."""

    def __init__(self, num_experts: int, window: int = 0):
        super().__init__()
        self.window = int(window)
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.last: Optional[torch.Tensor] = None  # what the last pass balanced on (a recomputation reuses it)

    def forward(self, counts: torch.Tensor, sequences: torch.Tensor, recomputing: bool = False) -> torch.Tensor:
        """The load to balance, given this pass's ``counts`` [E] and ``sequences`` (both of every rank).

        Updates ``S`` in training mode; an eval pass reads it without moving it, and a gradient-checkpointing
        recomputation of a training pass gets what that pass got (``recomputing``), so the update happens once.
        """
        if self.window == 0:
            return counts
        if recomputing and self.last is not None:
            return self.last.to(counts.dtype)
        decay = (1.0 - 1.0 / self.window) ** sequences.double()
        total = self.load * decay + counts.double()
        if self.training:
            self.load.copy_(total)
            self.last = total
        return total.to(counts.dtype)

    def select(self, index: torch.Tensor) -> None:
        """Expert j's window becomes old expert ``index[j]``'s (pruning and dynamic allocation)."""
        self.load = self.load.index_select(0, index.to(self.load.device))
        self.last = None

    def reset(self) -> None:
        self.load.zero_()
        self.last = None
