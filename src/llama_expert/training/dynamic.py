"""Dynamic expert allocation (``expert_allocation="dynamic"``): grow experts where routing asks, retire idle ones.

Training starts from half of the progressive allocation (``modeling.allocation.dynamic_start``). Every
``dynamic_interval`` steps, from the routing statistics of the steps since the last change (each layer's
share of the (token, slot) assignments per expert):

1. **retire** every expert whose load is below ``dynamic_retire_share / E_l`` (the layer keeps at least what
   its router needs);
2. **grow** up to the budget (``dynamic_budget`` experts in all, default the progressive allocation's total,
   so that dynamic, progressive and uniform can be compared at one size): repeatedly split the expert with
   the largest load relative to uniform (``load * E_l``), in a layer below ``num_experts``: its copy gets the
   same rows plus noise of 1% of each row's spread (router row included), so the two share its tokens and
   then drift apart. The optimiser state follows the rows (a copy starts with its parent's Adam moments).

The noise comes from a generator seeded by (seed, step), and the statistics since the last change are part of
the checkpoint, so a resumed run makes the same decisions as an uninterrupted one. Each change is logged
(``{"event": "allocation", ...}`` in ``train_log.jsonl``); after training ``allocation.png`` draws them.
Single process only: under DDP each rank would need the same decisions and a re-wrapped model.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..integration.surgery import adapters
from ..modeling.allocation import progressive
from .hooks import TrainingHook

SPLIT_NOISE = 0.01


class DynamicAllocation(TrainingHook):
    name = "dynamic"
    single_process = True  # every rank would need the same decisions and a re-wrapped model

    def __init__(self, config, seed: int):
        self.config = config
        self.seed = seed

    def budget(self, num_layers: int) -> int:
        return self.config.dynamic_budget or sum(progressive(self.config.num_experts, self.config.top_k, num_layers))

    def start(self, model, step: int, saved: Optional[dict]) -> List[dict]:
        """Count every routing decision from now on (training passes included); a resumed run goes on from the
        statistics since the checkpoint's last change. A fresh run logs where the allocation starts (the first
        column of ``allocation.png``)."""
        for _, adapter in adapters(model):
            adapter.router.reset_statistics()
            adapter.router.record_statistics = True
        if saved is not None:
            self.load_state(model, saved)
            return []
        return [self.allocation_event(model, 0)] if step == 0 else []

    def pause(self, model) -> None:
        """Stop counting (validation passes, the end of training); ``resume`` goes on without a reset."""
        for _, adapter in adapters(model):
            adapter.router.record_statistics = False

    def resume(self, model) -> None:
        for _, adapter in adapters(model):
            adapter.router.record_statistics = True

    def finish(self, model) -> None:
        self.pause(model)

    def allocation_event(self, model, step: int, retired=(), grown=()) -> Dict:
        """The ``train_log.jsonl`` record of the allocation at ``step`` (experts per layer, what changed)."""
        return {"event": "allocation", "step": step, "experts": [a.num_experts for _, a in adapters(model)],
                "retired": list(retired), "grown": list(grown)}

    @torch.no_grad()
    def after_step(self, model, step: int) -> Optional[Dict]:
        """At every ``dynamic_interval``-th step: retire and grow; returns the event (with ``transfers`` for the
        optimiser), or None when nothing is due."""
        if step % self.config.dynamic_interval:
            return None
        layers = [adapter for _, adapter in adapters(model)]
        loads = []
        for adapter in layers:
            counts = adapter.router.expert_counts.double()[:adapter.num_experts]  # a null expert's count goes
            loads.append((counts / counts.sum()).tolist() if float(counts.sum()) > 0 else
                         [1.0 / adapter.num_experts] * adapter.num_experts)
        transfers, retired, grown = [], [], []
        for index, (adapter, load) in enumerate(zip(layers, loads)):
            floor = self.config.dynamic_retire_share / adapter.num_experts
            idle = [e for e, share in enumerate(load) if share < floor]
            keep = [e for e in range(adapter.num_experts) if e not in idle]
            while len(keep) < adapter.router.min_experts:  # keep the busiest of the idle ones
                keep.append(max((e for e in idle if e not in keep), key=lambda e: load[e]))
            if len(keep) < adapter.num_experts:
                retired += [(index, e) for e in range(adapter.num_experts) if e not in keep]
                transfers += adapter.keep_experts(sorted(keep))
                loads[index] = [load[e] for e in sorted(keep)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        total = sum(adapter.num_experts for adapter in layers)
        while total < self.budget(len(layers)):
            candidates = [(load[e] * len(load), index, e) for index, (adapter, load) in enumerate(zip(layers, loads))
                          for e in range(len(load)) if adapter.num_experts < self.config.num_experts]
            if not candidates:
                break
            _, index, expert = max(candidates, key=lambda c: (c[0], -c[1], -c[2]))  # ties: the lowest layer, expert
            transfers += layers[index].split_expert(expert, SPLIT_NOISE, generator)
            half = loads[index][expert] / 2  # the copy takes half of its parent's tokens, for the next choice
            loads[index][expert] = half
            loads[index].append(half)
            grown.append((index, expert))
            total += 1
        for adapter in layers:
            adapter.router.reset_statistics()
        return {**self.allocation_event(model, step, retired, grown), "transfers": transfers}

    def state(self, model) -> Dict[str, List]:
        """The routing statistics since the last change (a resumed run must decide from the same numbers)."""
        return {"expert_counts": [a.router.expert_counts.tolist() for _, a in adapters(model)],
                "entropy_sum": [float(a.router.entropy_sum) for _, a in adapters(model)],
                "tokens_seen": [float(a.router.tokens_seen) for _, a in adapters(model)]}

    def load_state(self, model, state: Dict[str, List]) -> None:
        for (_, adapter), counts, entropy, tokens in zip(adapters(model), state["expert_counts"],
                                                         state["entropy_sum"], state["tokens_seen"]):
            router = adapter.router
            router.expert_counts = torch.tensor(counts, dtype=torch.float64, device=router.expert_counts.device)
            router.entropy_sum.fill_(entropy)
            router.tokens_seen.fill_(tokens)
