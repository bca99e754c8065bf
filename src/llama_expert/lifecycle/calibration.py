"""Calibration text for pruning and distillation: the first tokens of each source, in windows."""

from __future__ import annotations

import torch

from ..data import load_split, pack_blocks, split_sources, tokenize_documents


def calibration_windows(tokenizer, calibration: str, seq_len: int, max_tokens: int, progress: bool) -> torch.Tensor:
    """The first ``max_tokens`` tokens of each (comma-separated) calibration source, in windows of ``seq_len``,
    from each source's training split (so that test text stays unseen)."""
    windows = []
    for source in split_sources(calibration):
        ids = tokenize_documents(load_split(source, None, tokenizer, "train"), tokenizer, progress)
        windows.append(pack_blocks(ids, seq_len, max_tokens=max_tokens))
    return torch.cat(windows)
