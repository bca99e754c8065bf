"""An adapter's ``adapter_model.safetensors`` read as untrusted input: shapes first, then finite tensors.

Adapter folders travel between machines and people, so nothing in them is trusted before it is checked. The
header alone says every tensor's shape (``header_tensors``: no tensor is read), which lets a caller compare
the shapes a config implies with the file's before building anything. ``load_finite`` reads the tensors and
refuses NaN or infinite values: they would otherwise load silently and turn every output into NaN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import AdapterError

_UNREADABLE = (SafetensorError, OSError, ValueError)


def _corrupt(path: Path, exc: Exception) -> AdapterError:
    return AdapterError(f"{path} is corrupt ({exc}). Re-save or re-train the adapter.")


def header_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of the file as a meta tensor of its shape, from the header alone (no tensor is read)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
    except _UNREADABLE as exc:
        raise _corrupt(path, exc) from None


def load_finite(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of ``path``; an AdapterError naming the first tensor that holds NaN or an infinity."""
    try:
        state = load_file(str(path))
    except _UNREADABLE as exc:
        raise _corrupt(path, exc) from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{path} holds non-finite values (NaN or inf) in tensor {key}: the adapter diverged "
                               f"in training or the file was damaged. Re-train it, or use an earlier checkpoint.")
    return state
