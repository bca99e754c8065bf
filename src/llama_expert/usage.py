"""Expert usage per layer: how often each expert is chosen, router entropy, and a heatmap.

The routers count their choices (``NoisyTopKGating.expert_counts``) while ``recording_routing`` is on;
these helpers run that pass, turn the counts into fractions and draw them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import torch

from .surgery import adapters, reset_routing_statistics


def expert_usage(model) -> List[Dict[str, object]]:
    """Per layer: counts, load fractions (sum to 1), normalised router entropy (1 = uniform)."""
    rows = []
    for layer, (name, adapter) in enumerate(adapters(model)):
        router = adapter.router
        counts = router.expert_counts.detach().cpu().double()
        total = float(counts.sum())
        tokens = float(router.tokens_seen)
        entropy = float(router.entropy_sum) / tokens if tokens else 0.0
        rows.append({"layer": layer, "module": name, "num_experts": adapter.num_experts,
                     "counts": [int(c) for c in counts.tolist()],
                     "fractions": [float(c) / total if total else 0.0 for c in counts.tolist()],
                     "tokens": int(tokens), "entropy": entropy,
                     "normalized_entropy": entropy / math.log(adapter.num_experts) if adapter.num_experts > 1 else 1.0})
    return rows


@torch.no_grad()
def measure_expert_usage(model, windows: torch.Tensor, batch_size: int = 1) -> List[Dict[str, object]]:
    """Route ``windows`` in eval mode (no noise) and return the usage table."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with recording_routing(model):
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    return expert_usage(model)


@contextmanager
def recording_routing(model):
    """Reset the routers' statistics and count every routing decision made inside the block."""
    routers = [adapter.router for _, adapter in adapters(model)]
    reset_routing_statistics(model)
    for router in routers:
        router.record_statistics = True
    try:
        yield
    finally:
        for router in routers:
            router.record_statistics = False


def save_usage_heatmap(usage: List[Dict[str, object]], path, title: str = "Expert usage") -> Path:
    """A layers x experts heatmap of load fractions (blank where a layer has fewer experts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(row["num_experts"] for row in usage)
    grid = np.full((len(usage), width), np.nan)
    for row in usage:
        grid[row["layer"], : row["num_experts"]] = row["fractions"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * width, 1.0 + 0.25 * len(usage)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(width))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of (token, slot) assignments")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
