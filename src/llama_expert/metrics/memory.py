"""Peak memory of this process: CUDA's peak allocation on a GPU, the peak resident set size elsewhere.

The one place that reads it, for training summaries and the benchmark alike; and ``tensor_bytes`` /
``model_bytes``, what a (possibly quantised) tensor or model holds. ``ru_maxrss`` is in
kilobytes on Linux and in bytes on macOS; the peak RSS cannot be reset, so it covers everything the
process did before (model loading included).
"""

from __future__ import annotations

import resource
import sys
from typing import Dict

import torch


def peak_memory(device: torch.device) -> Dict:
    if device.type == "cuda":
        return {"kind": "peak CUDA memory allocated", "bytes": int(torch.cuda.max_memory_allocated(device)),
                "note": "since the last reset of CUDA's peak statistics"}
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"kind": "peak RSS of the process", "bytes": int(usage * scale),
            "note": "cannot be reset: covers everything this process did so far, model loading included"}


def tensor_bytes(tensor) -> int:
    """Bytes a tensor holds, through quantised tensor subclasses (quanto: packed data + scales + shifts;
    bitsandbytes: packed data + its quantisation state)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    while state is not None:  # bitsandbytes: absmax (itself quantised with double quantisation) and its code
        total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
        state = getattr(state, "state2", None)
    return total


def model_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer of ``model`` (a tied embedding / head table once), through
    quantised tensors."""
    return sum(tensor_bytes(t) for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
