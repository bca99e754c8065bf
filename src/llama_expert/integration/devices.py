"""``--device``: checked against what this torch build and machine have, before any model loads.

Without the check, ``--device cuda`` on a CPU-only build (or ``cuda:3`` on a one-GPU machine, or a name
torch does not know) fails with a traceback only after the model has loaded.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..errors import ConfigError

ACCELERATORS = ("cuda", "xpu", "mps")  # the device types torch reports through torch.<type>.is_available()


def _backend(kind: str):
    """``torch.cuda``, ``torch.xpu``, ``torch.mps``... when this torch has it and says it is usable; else None."""
    module = getattr(torch, kind, None)
    if kind == "mps":
        return module if torch.backends.mps.is_available() else None
    available = getattr(module, "is_available", None)
    return module if callable(available) and available() else None


def _count(kind: str) -> int:
    backend = _backend(kind)
    if backend is None:
        return 0
    return int(getattr(backend, "device_count", lambda: 1)())


def available_devices() -> List[str]:
    """What ``--device`` can be here: cpu, then each accelerator by index."""
    found = ["cpu"]
    for kind in ACCELERATORS:
        found += [f"{kind}:{i}" for i in range(_count(kind))]
    return found


def check_device(device: Optional[str]) -> None:
    """One line naming ``device`` and what is available, when the model could not be put there."""
    if not device:
        return
    here = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device} is not a device torch knows; available here: {here}.") from None
    if parsed.type == "cpu":
        return
    count = _count(parsed.type) if parsed.type in ACCELERATORS else 0
    if count == 0:
        why = (f"this torch ({torch.__version__}) is built without CUDA" if parsed.type == "cuda"
               and torch.version.cuda is None else f"no {parsed.type} device is available")
        raise ConfigError(f"--device {device}: {why}; available here: {here}.")
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: there {'is' if count == 1 else 'are'} only {count} {parsed.type} "
                          f"device{'s' if count > 1 else ''}; available here: {here}.")
