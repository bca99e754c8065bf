"""Routing health: how often each expert is chosen per layer, router entropy, and collapse warnings.

The routers count their choices (``NoisyTopKGating.expert_counts``) while ``recording_routing`` is on;
these helpers run that pass, turn the counts into fractions and flag experts that take almost nothing
or almost everything (``reports.save_usage_heatmap`` draws the fractions). A null expert is one more choice: its
count and fraction come last, in the column named ``"null"``; the warnings concern the real experts only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional, Dict, List

import torch

from ..errors import ConfigError
from ..integration.surgery import adapters, domain_labels, is_augmented, reset_routing_statistics
from ..progress import progress_bar


def expert_usage(model) -> List[Dict[str, object]]:
    """Per layer: counts and load fractions (sum to 1) per choice, named in ``experts`` (``"0"``, ``"1"``, ...,
    and ``"null"`` last for a null expert), normalised router entropy over all choices (1 = uniform)."""
    rows = []
    for layer, (name, adapter) in enumerate(adapters(model)):
        router = adapter.router
        counts = router.expert_counts.detach().cpu().double()
        total = float(counts.sum())
        tokens = float(router.tokens_seen)
        entropy = float(router.entropy_sum) / tokens if tokens else 0.0
        choices = len(counts)
        names = [str(e) for e in range(adapter.num_experts)] + ["null"] * (choices - adapter.num_experts)
        rows.append({"layer": layer, "module": name, "num_experts": adapter.num_experts, "experts": names,
                     "counts": [int(c) for c in counts.tolist()],
                     "fractions": [float(c) / total if total else 0.0 for c in counts.tolist()],
                     "tokens": int(tokens), "entropy": entropy,
                     "normalized_entropy": entropy / math.log(choices) if choices > 1 else 1.0})
    return rows


@torch.no_grad()
def measure_expert_usage(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
                         domains: Optional[torch.Tensor] = None) -> List[Dict[str, object]]:
    """Route ``windows`` in eval mode (no noise) and return the usage table (``progress``: a bar over them;
    ``domains``: each window's domain label, for the oracle router)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with recording_routing(model), progress_bar(windows.shape[0], "routing", "window", progress) as bar:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size]
                with domain_labels(model, domains[start:start + batch_size] if domains is not None else None):
                    model(input_ids=batch.to(device), use_cache=False)
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return expert_usage(model)


@contextmanager
def recording_routing(model, decisions: bool = False):
    """Reset the routers' statistics and count every routing decision made inside the block; with ``decisions``,
    each router also keeps every pass's ``Routing`` in ``router.decisions`` (read them inside the block). Counting
    turns the adapters' fast paths off, so the decisions are the general path's, which the fast paths equal."""
    routers = [adapter.router for _, adapter in adapters(model)]
    reset_routing_statistics(model)
    for router in routers:
        router.record_statistics = True
        router.decisions = [] if decisions else None
    try:
        yield
    finally:
        for router in routers:
            router.record_statistics = False
            router.decisions = None


@torch.no_grad()
def token_routing(model, input_ids: torch.Tensor) -> List[Dict[str, object]]:
    """Where each token of one sequence goes: per layer, ``gates`` [T, C] (float32, on the CPU), the gate of every
    choice for every token (0 where not chosen; a row sums to 1, or to less for switch's gate ``p_i`` and for a token
    that expert_choice gave no expert), with ``C`` the layer's choices, ``null`` (1 when its last is the null expert,
    else 0), ``top_k``, ``slots`` (the experts a token may get: ``top_k``, or every expert for expert_choice) and
    the adapter's ``module`` name, and ``logits`` [T, C] (float32, on the CPU: the router's clean logits, for a
    rule other than the router's own). ``input_ids``: [T] token ids, routed in one eval pass as
    ``routing_health`` routes a window (no noise)."""
    if not is_augmented(model):
        raise ConfigError("token_routing needs an augmented model (one with MoE adapters); this one has none.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with recording_routing(model, decisions=True):
            model(input_ids=input_ids.reshape(1, -1).to(device), use_cache=False)
            layers = [(name, adapter.router, adapter.router.decisions[-1]) for name, adapter in adapters(model)]
    finally:
        model.train(was_training)
    rows = []
    for name, router, routing in layers:
        gates = torch.zeros(routing.indices.shape[0], router.num_experts, dtype=torch.float32)
        gates.scatter_add_(1, routing.indices.cpu(), routing.gates.detach().float().cpu())
        rows.append({"module": name, "gates": gates, "null": int(router.null_choices), "top_k": int(router.top_k),
                     "slots": int(routing.indices.shape[1]), "logits": routing.logits.detach().float().cpu()})
    return rows


LOW_LOAD_FACTOR = 0.1  # warn when an expert gets less than LOW_LOAD_FACTOR / E of the assignments
COLLAPSE_SHARE = 0.9  # warn when more than this share of the tokens routes to one expert


def routing_health(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
                   domains: Optional[torch.Tensor] = None) -> Dict:
    """Per-layer expert load and router entropy over ``windows``.

    ``load``: each expert's share of the T*k (token, slot) assignments (sums to 1 per layer; uniform
    is 1/E). ``token_share``: the share of tokens that picked the expert (k * load, at most 1).
    ``entropy``: mean over tokens of the router's entropy over all E experts divided by log E
    (1 = uniform probabilities, 0 = one expert certain). Warnings: an expert with load below
    0.1/E ("nearly unused"), or picked by more than 90% of the tokens ("collapse"; checked only
    when E > k, since with E == k every expert serves every token). ``progress``: a bar over the windows;
    ``domains``: each window's domain label, for the oracle router.
    """
    if not is_augmented(model):
        raise ConfigError("routing_health needs an augmented model (one with MoE adapters); this one has none.")
    layers, warnings = [], []
    routers = [adapter.router for _, adapter in adapters(model)]
    for row in measure_expert_usage(model, windows, batch_size, progress, domains):
        index, num_experts, tokens = row["layer"], row["num_experts"], row["tokens"]
        router = routers[index]
        top_k = int(router.top_k)
        load = row["fractions"]
        share = [c / tokens if tokens else 0.0 for c in row["counts"]]
        layer_warnings = []
        for e in range(num_experts):
            if load[e] < LOW_LOAD_FACTOR / num_experts:
                layer_warnings.append(f"layer {index}: expert {e} takes {100 * load[e]:.2f}% of the assignments "
                                      f"(< {100 * LOW_LOAD_FACTOR / num_experts:.2f}% = 0.1/E): nearly unused")
            if num_experts > top_k and share[e] > COLLAPSE_SHARE:
                layer_warnings.append(f"layer {index}: expert {e} is picked by {100 * share[e]:.1f}% of the "
                                      f"tokens (> {100 * COLLAPSE_SHARE:.0f}%): collapse")
        warnings += layer_warnings
        layers.append({"layer": index, "module": row["module"], "num_experts": num_experts, "top_k": top_k,
                       "tokens": tokens, "experts": row["experts"], "load": load, "token_share": share,
                       "min_load": min(load[:num_experts]), "max_load": max(load[:num_experts]),
                       "entropy": row["entropy"],
                       "normalized_entropy": row["normalized_entropy"], "warnings": layer_warnings})
    return {"windows": int(windows.shape[0]), "tokens": int(windows.numel()),
            "thresholds": {"nearly_unused_load_below": "0.1/E", "collapse_token_share_above": COLLAPSE_SHARE},
            "layers": layers, "warnings": warnings, "healthy": not warnings}


def normalized_mutual_information(joint: torch.Tensor) -> float:
    """NMI of a [domains, experts] count table: I(D; E) / mean(H(D), H(E)) (0: independent, 1: determined).

    The arithmetic-mean normalisation is scikit-learn's default; it is 0 when either marginal is constant.
    """
    p = joint.double() / joint.sum()
    pd, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nonzero = p > 0
    mutual = float((p[nonzero] * (p[nonzero] / (pd @ pe)[nonzero]).log()).sum())
    h_d, h_e = float(torch.special.entr(pd).sum()), float(torch.special.entr(pe).sum())
    return 0.0 if h_d == 0 or h_e == 0 else max(0.0, mutual / ((h_d + h_e) / 2))


@torch.no_grad()
def domain_specialisation(model, windows: torch.Tensor, domains: torch.Tensor, names: List[str],
                          batch_size: int = 1, progress: bool = True) -> List[Dict[str, object]]:
    """Per layer: how each domain's (token, slot) assignments spread over the experts, and the NMI between
    domain and chosen expert. ``domains[i]`` labels window ``i`` with its index in ``names``."""
    per_domain = [measure_expert_usage(model, windows[domains == d], batch_size, progress, domains[domains == d])
                  for d in range(len(names)) if bool((domains == d).any())]
    present = [names[d] for d in range(len(names)) if bool((domains == d).any())]
    rows = []
    for layer in range(len(per_domain[0])):
        joint = torch.tensor([usage[layer]["counts"] for usage in per_domain], dtype=torch.float64)
        rows.append({"layer": layer, "domains": present,
                     "domain_fractions": (joint / joint.sum(1, keepdim=True)).tolist(),
                     "nmi": normalized_mutual_information(joint)})
    return rows


def expert_usage_by_domain(model, windows: torch.Tensor, domains: Optional[torch.Tensor] = None,
                           names: Optional[List[str]] = None, progress: bool = True) -> List[Dict[str, object]]:
    """``measure_expert_usage`` over all ``windows``; with two or more domain ``names`` (``domains[i]``: the
    index of window i's domain) each layer's row also gets ``domains``, ``domain_fractions`` and
    ``domain_expert_nmi`` (what ``reports.save_domain_heatmap`` draws)."""
    usage = measure_expert_usage(model, windows, progress=progress, domains=domains)
    if names and len(names) > 1 and domains is not None:
        for row, by_domain in zip(usage, domain_specialisation(model, windows, domains, names, progress=progress)):
            row.update(domain_fractions=by_domain["domain_fractions"], domains=by_domain["domains"],
                       domain_expert_nmi=by_domain["nmi"])
    return usage

