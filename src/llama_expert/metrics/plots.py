"""Figures: expert usage per layer, domain x expert usage, the allocation over training, and bar charts. The only
module that imports matplotlib (lazily, inside each function, so that nothing else pays for it)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path) -> Path:
    """Lay out, write as a 100-dpi PNG and close ``fig``."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_chart(path, labels: Sequence[str], values: Sequence[float], title: str, ylabel: str, fmt: str,
              colors: Dict[str, str]) -> Path:
    """One bar per label, each annotated with its value (``fmt``), coloured by label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(labels, values, color=[colors.get(n, "#555555") for n in labels])
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return save_figure(plt, fig, path)


def choice_names(row: Dict[str, object]) -> List[str]:
    """The names of a usage row's columns: its ``experts`` (``"null"`` last for a null expert), else 0..E-1."""
    return list(row.get("experts") or [str(e) for e in range(len(row["fractions"]))])


def save_usage_heatmap(usage: List[Dict[str, object]], path, title: str = "Expert usage") -> Path:
    """A layers x experts heatmap of load fractions (blank where a layer has fewer experts); a null expert's share
    in a last column of its own, "null"."""
    import numpy as np

    plt = pyplot()

    experts = max(row["num_experts"] for row in usage)
    nulls = max(len(row["fractions"]) - row["num_experts"] for row in usage)
    grid = np.full((len(usage), experts + nulls), np.nan)
    for row in usage:
        grid[row["layer"], : row["num_experts"]] = row["fractions"][: row["num_experts"]]
        grid[row["layer"], experts:experts + len(row["fractions"]) - row["num_experts"]] = \
            row["fractions"][row["num_experts"]:]
    width = experts + nulls
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * width, 1.0 + 0.25 * len(usage)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(width))
    ax.set_xticklabels([str(e) for e in range(experts)] + ["null"] * nulls)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of (token, slot) assignments")
    return save_figure(plt, fig, path)


def save_domain_heatmap(usage: List[Dict[str, object]], path, title: str = "Domain x expert usage") -> Path:
    """One small domains x experts heatmap per layer (each domain's share of its assignments per expert),
    titled with the layer's normalised mutual information between domain and expert."""
    import math

    plt = pyplot()
    columns = min(6, len(usage))
    rows = math.ceil(len(usage) / columns)
    domains = usage[0]["domains"]
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 0.5 + (0.35 * len(domains) + 0.6) * rows),
                             squeeze=False)
    for ax in axes.flat[len(usage):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, usage):
        ax.imshow(row["domain_fractions"], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {row['layer']}  NMI {row['domain_expert_nmi']:.2f}", fontsize=8)
        ax.set_xticks(range(len(row["fractions"])))
        ax.set_xticklabels(choice_names(row))
        ax.tick_params(labelsize=6)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if ax in axes[:, 0] else [], fontsize=7)
    fig.suptitle(f"{title}: each domain's share of its assignments per expert (0 to 1)")
    return save_figure(plt, fig, path)


def save_allocation_plot(events: List[Dict[str, object]], path, title: str = "Experts per layer over training") -> Path:
    """Experts per layer (rows) after each allocation change (columns, labelled by step), as a heatmap."""
    plt = pyplot()
    table = [[int(n) for n in event["experts"]] for event in events]  # [changes][layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(events) + 2), max(3.0, 0.18 * len(table[0]) + 1)))
    image = ax.imshow(list(map(list, zip(*table))), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(events)))
    ax.set_xticklabels([str(event["step"]) for event in events], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (total {sum(table[-1])})")
    fig.colorbar(image, ax=ax, label="experts")
    return save_figure(plt, fig, path)

