"""The routers' balancing windows (``ExpertConfig.balance_window``) in training checkpoints, as a hook.

Why a hook: the window (``modeling/routing/window.py``) is a non-persistent buffer, so neither the adapter file nor
the method's checkpoint weights hold it (inference never reads it). Without it a resumed run would start balancing
from an empty window and stop matching an uninterrupted run; with it, ``--resume`` stays exact.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..integration.surgery import adapters
from .hooks import TrainingHook


class BalanceWindowState(TrainingHook):
    name = "balance_window"

    def start(self, model, step: int, saved: Optional[dict]) -> List[dict]:
        """A resumed run gets each layer's window back (a fresh run starts from empty ones)."""
        if saved is not None:
            for (_, adapter), load in zip(adapters(model), saved["load"]):
                window = adapter.router.load_window
                window.load = load.to(dtype=torch.float64, device=window.load.device).clone()
                window.last = None
        return []

    def state(self, model) -> Dict[str, List[torch.Tensor]]:
        return {"load": [adapter.router.load_window.load.detach().cpu().clone() for _, adapter in adapters(model)]}
