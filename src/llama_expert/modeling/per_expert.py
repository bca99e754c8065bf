"""Keeping a subset of a layer's experts: the rows of every per-expert tensor, in one place (pruning uses it)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def keep_rows(module: nn.Module, names: Sequence[str], keep: torch.Tensor) -> None:
    """Replace each parameter ``names`` of ``module`` (stacked by expert along dim 0) by its rows ``keep``."""
    for name in names:
        old = getattr(module, name, None)
        if old is None:
            continue
        setattr(module, name, nn.Parameter(old.detach().index_select(0, keep.to(old.device)).clone(),
                                           requires_grad=old.requires_grad))
