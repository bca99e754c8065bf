"""What ``serve`` shows of the routing: ``POST /v1/routing`` answers a text's tokens and the expert each layer chose
for each of them, and ``GET /`` serves a page (``routing_page.html``, inline CSS and JavaScript: it works offline)
that colours the tokens by expert, per layer or over all layers, beside a chat box.

The routing is ``metrics.routing.token_routing``, the capture ``routing_health`` counts with, run as a ``Job`` on the
batching worker (the one thread that uses the model). Expert indices are the same in every layer's row: a layer's
null expert (``null_expert``) is always the last index, ``num_experts - 1``, even in a layer pruned to fewer experts.
Labels: the names ``mix`` recorded for a mixed adapter's experts (its branches' folder names), else ``expert i``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Dict, List, Optional

import torch

from ..integration.adapter_files import expert_names
from ..integration.surgery import adapters

PAGE = "routing_page.html"
NULL_LABEL = "null (base model)"


def page_html(model_name: str, needs_key: bool) -> str:
    """The page, told the served model's name and whether requests need an API key (a JSON island, ``<``
    escaped so that no text can close the script element)."""
    settings = json.dumps({"model": model_name, "needs_key": needs_key}).replace("<", "\\u003c")
    return resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8").replace("{{SETTINGS}}", settings)


def token_pieces(tokenizer, text: str, ids: List[int]) -> List[str]:
    """Each token's piece of ``text``: the pieces join to ``text`` exactly (a special token's piece is empty; the
    bytes of one character split over tokens show on its first). A fast tokenizer's offsets give them; else each
    token's piece is what decoding it adds to the decoded tokens before it."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True)
        if encoded["input_ids"] == ids:
            pieces, done = [], 0
            for _, end in encoded["offset_mapping"]:
                pieces.append(text[done:max(done, end)])
                done = max(done, end)
            if pieces:
                pieces[-1] += text[done:]
            return pieces
    decoded = [tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]
    return [decoded[i + 1][len(decoded[i]):] for i in range(len(ids))]


def expert_labels(model, adapter_folder: Optional[str]) -> List[str]:
    """One label per expert index (the null's last): a mix's recorded names, else ``expert i``."""
    layers = [adapter for _, adapter in adapters(model)]
    real = max(adapter.router.real_experts for adapter in layers)
    names = expert_names(adapter_folder, real) if adapter_folder else None
    null = [NULL_LABEL] if any(adapter.router.null_choices for adapter in layers) else []
    return (names or [f"expert {i}" for i in range(real)]) + null


def routing_answer(rows: List[Dict[str, object]], labels: List[str]) -> Dict[str, object]:
    """``token_routing``'s rows as the JSON ``/v1/routing`` answers (without the tokens): per layer the expert each
    token chose (its largest gate; null where it got none), and with more than one expert a token, every gate."""
    choices = len(labels)
    layers = []
    for index, row in enumerate(rows):
        gates = row["gates"]
        dense = torch.zeros(gates.shape[0], choices)
        real = gates.shape[1] - row["null"]
        dense[:, :real] = gates[:, :real]
        if row["null"]:
            dense[:, choices - 1] = gates[:, real]
        best, chosen = dense.max(dim=1)
        layer = {"layer": index, "module": row["module"], "top_k": row["top_k"],
                 "experts": [int(e) if g > 0 else None for e, g in zip(chosen.tolist(), best.tolist())]}
        if row["slots"] > 1:
            layer["gates"] = [[round(g, 4) for g in token] for token in dense.tolist()]
        layers.append(layer)
    return {"object": "routing", "num_experts": choices, "null_expert": any(row["null"] for row in rows),
            "experts": labels,
            "top_k": max(layer["top_k"] for layer in layers), "layers": layers}
