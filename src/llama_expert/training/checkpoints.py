"""Training checkpoints that survive a crash: written beside their final name, then swapped in.

A checkpoint folder holds the adapter files (loadable on their own) and ``training_state.pt``: the
optimizer, scheduler and RNG states and the position in the data. Swapping is two renames; a crash
between them leaves ``.old-<name>``, which ``latest_checkpoint`` still finds.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..files import previous_version, write_folder

STATE_NAME = "training_state.pt"


def write_checkpoint(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Write a checkpoint folder atomically (see ``llama_expert.files.write_folder``)."""
    return write_folder(folder, fill)


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The complete checkpoint at ``folder`` (or its previous version after a crash mid-swap), if any."""
    for candidate in (Path(folder), previous_version(folder)):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
