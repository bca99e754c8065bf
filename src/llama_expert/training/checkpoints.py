"""Training checkpoints that survive a crash and run no code when read.

A checkpoint folder holds the adapter files (loadable on their own) and the training state: the step,
the optimizer, scheduler and every rank's RNG states, the run's settings and its validation history.
The state is ``training_state.json`` plus ``training_state.safetensors`` for its tensors: no pickle, so
a checkpoint folder from someone else cannot execute anything on ``--resume`` (``torch.load`` of a
pickle can). Nested values are stored as JSON with tensors, numpy arrays and tuples replaced by
markers that point into the safetensors file, and restored to the same types.

Folders are written beside their final name and swapped in (``llama_expert.files.write_folder``); a
crash between the two renames leaves ``.old-<name>``, which ``checkpoint_candidates`` still finds.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import files
from ..errors import ConfigError, LlamaExpertError
from ..files import previous_version, write_folder

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
LEGACY_STATE = "training_state.pt"  # pickled state of older versions: never loaded
# Where older versions staged a checkpoint (``.tmp-last-*``): the checkpoints folder holds only what write_folder
# writes, so such a folder there is a killed write of ours, cleaned up as the current staging is.
STAGING_PREFIXES = (files.STAGING_PREFIX, ".tmp-")


class CheckpointError(LlamaExpertError):
    """A checkpoint that cannot be read: corrupt, truncated, or of a format that is not loaded."""


def _pack(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"cannot store a dict with keys {list(value)[:3]} in a checkpoint")
        # JSON keys are strings: remember which were ints (optimizer state is keyed by parameter index)
        return {"__dict__": [[k, _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _unpack(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(_unpack(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _unpack(v, tensors) for k, v in value["__dict__"]}
    if "__float__" in value:
        return float(value["__float__"])
    raise CheckpointError(f"unknown marker in a training state: {sorted(value)}")


def save_training_state(folder: Path, state: dict) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    packed = _pack(state, tensors)
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    # written into write_folder's staging folder, which is fsynced and swapped in whole
    (Path(folder) / STATE_JSON).write_text(json.dumps(packed, allow_nan=False) + "\n", encoding="utf-8")


def load_training_state(folder: Path) -> dict:
    """The state saved by ``save_training_state``; CheckpointError when it is missing, corrupt or pickled."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file() and (folder / LEGACY_STATE).is_file():
        raise CheckpointError(f"{folder} holds a pickled {LEGACY_STATE}, which llama-expert no longer loads: "
                              f"unpickling can run arbitrary code. Train again in a new --output-dir (the adapter "
                              f"files in {folder} still load with --adapter).")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
        return _unpack(json.loads((folder / STATE_JSON).read_text()), tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"the training state in {folder} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_JSON).is_file() or (Path(folder) / LEGACY_STATE).is_file()


def write_checkpoint(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Write a checkpoint folder atomically (see ``llama_expert.files.write_folder``)."""
    return write_folder(folder, fill)


def checkpoint_places(checkpoints: Path) -> List[Path]:
    """Where a checkpoint to resume from may be, in order of preference: ``last``, its previous version
    after a crash mid-swap, then ``best`` (the step of each is in its state)."""
    checkpoints = Path(checkpoints)
    return [checkpoints / "last", previous_version(checkpoints / "last"), checkpoints / "best"]


def checkpoint_candidates(checkpoints: Path) -> List[Path]:
    """The complete checkpoints among ``checkpoint_places``, in that order."""
    return [c for c in checkpoint_places(checkpoints) if is_checkpoint(c)]


def require_checkpoint(checkpoints: Path) -> None:
    """``--resume`` with nothing to resume would silently start a new run at step 0: refuse it."""
    if not any(place.exists() for place in checkpoint_places(checkpoints)):
        raise ConfigError(f"--resume: there is no checkpoint in {checkpoints}; drop --resume to start a new run "
                          f"there, or pass the --output-dir of the run to continue.")


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The complete checkpoint at ``folder`` (or its previous version after a crash mid-swap), if any."""
    for candidate in (Path(folder), previous_version(folder)):
        if is_checkpoint(candidate):
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
