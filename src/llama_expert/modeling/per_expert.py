"""Selecting a layer's experts (pruning keeps some, dynamic allocation duplicates some): the rows of every
per-expert tensor, in one place."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

# (the parameter before, the parameter after, the rows of the old one the new one holds): what an optimiser
# needs to carry its per-row state (e.g. Adam's moments) over to the new parameter
Transfer = Tuple[nn.Parameter, nn.Parameter, torch.Tensor]


def select_rows(module: nn.Module, names: Sequence[str], index: torch.Tensor) -> List[Transfer]:
    """Replace each parameter ``names`` of ``module`` (stacked by expert along dim 0) by its rows ``index``
    (repeats allowed: a repeated row is a copy)."""
    transfers = []
    for name in names:
        old = getattr(module, name, None)
        if old is None:
            continue
        new = nn.Parameter(old.detach().index_select(0, index.to(old.device)).clone(), requires_grad=old.requires_grad)
        setattr(module, name, new)
        transfers.append((old, new, index))
    return transfers
