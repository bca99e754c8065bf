"""How many experts each decoder layer gets: registered allocation rules, or an explicit list.

``progressive`` follows the seed on 16 layers (layers 0-1 get 4, layers 2-7 ramp 6->8, layers 8-15 ramp
6->4) and scales the same shape to any depth by relative position; MoLA (NAACL 2025) reports that such a
shape matches uniform allocation with fewer parameters. ``uniform`` gives ``num_experts`` everywhere.
"""

from __future__ import annotations

import math
from typing import List

from ..config import ExpertConfig
from ..errors import ConfigError
from ..options import flag_for
from .registry import Registry

ALLOCATIONS = Registry("expert allocation", flag_for(ExpertConfig, "expert_allocation"))


@ALLOCATIONS.register("uniform")
def uniform(num_experts: int, top_k: int, num_layers: int) -> List[int]:
    return [num_experts] * num_layers


@ALLOCATIONS.register("progressive")
def progressive(num_experts: int, top_k: int, num_layers: int) -> List[int]:
    high = num_experts
    if num_layers <= 2:
        return [high] * num_layers
    low = max(top_k, math.ceil(high / 2))
    mid = (low + high) / 2
    counts = []
    first_end = max(1, round(num_layers / 8))  # the first 1/8 of the layers
    middle_end = max(first_end + 1, round(num_layers / 2))  # ... up to the middle
    for layer in range(num_layers):
        if layer < first_end:
            value = low
        elif layer < middle_end:
            span = middle_end - 1 - first_end
            value = high if span <= 0 else mid + (high - mid) * (layer - first_end) / span
        else:
            span = max(1, num_layers - 1 - middle_end)
            value = mid + (low - mid) * (layer - middle_end) / span
        counts.append(int(min(high, max(low, math.floor(value + 0.5)))))
    return counts


@ALLOCATIONS.register("dynamic")
def dynamic_start(num_experts: int, top_k: int, num_layers: int) -> List[int]:
    """Where dynamic allocation starts: half of the progressive allocation per layer (at least top_k); the
    trainer then grows and retires experts (``training/dynamic.py``: the hook that ``grows_in_training`` asks for)."""
    return [max(top_k, math.ceil(n / 2)) for n in progressive(num_experts, top_k, num_layers)]


dynamic_start.grows_in_training = True  # the other rules keep their counts while training


def grows_in_training(allocation) -> bool:
    """Whether the allocation changes while the adapters train (an explicit list of counts never does)."""
    return isinstance(allocation, str) and getattr(ALLOCATIONS.get(allocation), "grows_in_training", False)


def experts_per_layer(config, num_layers: int) -> List[int]:
    """Number of experts in each of ``num_layers`` decoder layers under ``config.expert_allocation``."""
    allocation = config.expert_allocation
    if isinstance(allocation, list):
        if len(allocation) != num_layers:
            raise ConfigError(f"--expert-allocation lists {len(allocation)} layers but the model has "
                              f"{num_layers} decoder layers; give exactly one count per layer.")
        return list(allocation)
    return ALLOCATIONS.get(allocation)(config.num_experts, config.top_k, num_layers)
