"""Is the Hugging Face Hub reachable? Asked once, so that offline use fails in a second, not a minute.

Without a network, Transformers and Datasets retry with back-off for 25-50 s before they give up. One
TCP connection attempt to the Hub (or to the HTTPS proxy, when one is set) answers the question in at
most ``timeout`` seconds; when it fails, loaders read only the local cache and say which local forms
work. ``HF_HUB_OFFLINE=1`` skips the probe.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from contextlib import contextmanager
from typing import Optional
from urllib.parse import urlparse

TRUE = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline_reason(timeout: float = 3.0) -> Optional[str]:
    """None when the Hub answers; otherwise why it cannot be used (offline mode, or the connection error)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return "HF_HUB_OFFLINE is set"
    target = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or hub_endpoint()
    return _probe(target, timeout)


@functools.lru_cache(maxsize=8)
def _probe(url: str, timeout: float) -> Optional[str]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    return None


@contextmanager
def offline_mode(enabled: bool):
    """Hugging Face libraries' own offline switch for one block (their flags are read at each call).

    ``local_files_only`` alone does not reach every lookup (Transformers also looks for a PEFT adapter
    file on the Hub), and setting ``HF_HUB_OFFLINE`` after import has no effect; the flags do.
    """
    if not enabled:
        yield
        return
    import huggingface_hub.constants as hub_constants

    flags = [(hub_constants, "HF_HUB_OFFLINE")]
    if "datasets" in sys.modules:
        flags.append((sys.modules["datasets"].config, "HF_HUB_OFFLINE"))
    saved = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, True)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)
