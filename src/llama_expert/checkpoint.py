"""Training checkpoints that survive a crash: written beside their final name, then swapped in.

A checkpoint folder holds the adapter files (loadable on their own) and ``training_state.pt``: the
optimizer, scheduler and RNG states and the position in the data. Swapping is two renames; a crash
between them leaves ``.old-<name>``, which ``latest_checkpoint`` still finds.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

STATE_NAME = "training_state.pt"


def write_checkpoint(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Create ``folder`` atomically: ``fill(tmp)`` writes into a fresh sibling, which is renamed onto it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    old = folder.parent / f".old-{folder.name}"
    try:
        fill(staging)
        for f in staging.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The complete checkpoint at ``folder`` (or its ``.old-`` twin after a crash mid-swap), if any."""
    folder = Path(folder)
    for candidate in (folder, folder.parent / f".old-{folder.name}"):
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
