"""Token-level perplexity over non-overlapping windows: ``exp(mean NLL)`` over every predicted token.

This is the protocol of the quantisation papers (GPTQ, AWQ): the split's lines joined with blank lines,
tokenised once, cut into windows of ``seq_len`` (2048 by default there). Each window predicts its
``seq_len - 1`` next tokens; no context crosses a window boundary.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..integration.surgery import domain_labels
from ..progress import progress_bar


@torch.no_grad()
def evaluate_perplexity(model, windows: torch.Tensor, batch_size: int = 1, autocast_dtype=None,
                        progress: bool = True, domains: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """``windows``: ``[n, seq_len]`` token ids. Returns perplexity, mean NLL and the counts evaluated.

    ``progress``: a bar over the windows (a full test split at 2048 tokens takes minutes on a CPU). ``domains``
    [n]: each window's domain label, for a model routed by it (the oracle router; others ignore it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    try:
        with progress_bar(windows.shape[0], "perplexity", "window", progress) as bar:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size].to(device)
                labels = domains[start:start + batch_size] if domains is not None else None
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None), \
                        domain_labels(model, labels):
                    logits = model(input_ids=batch).logits
                nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                      batch[:, 1:].reshape(-1), reduction="sum")
                total_nll += nll.item()
                total_tokens += batch[:, 1:].numel()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1])}
