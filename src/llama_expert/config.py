"""ExpertConfig: every knob of the MoE adapters, validated once, stored as JSON beside the adapter.

Validation happens at construction so that a config that cannot work (top_k > num_experts, a rank of 0,
an unknown allocation) fails before a model is loaded, with a message that names the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

from .errors import ConfigError

ALLOCATIONS = ("progressive", "uniform")
EXPERT_TYPES = ("shared_core", "shared_down")


@dataclass
class ExpertConfig:
    """Configuration of the MoE adapters.

    expert_type:
        ``shared_core`` (default): per layer one shared down-projection ``A: d->r`` and one shared
        up-projection ``B: r->d`` (zero-initialised); each expert owns a small nonlinear core in the
        r-dimensional space. Fits the 0.2% budget on Llama 3.2 1B.
        ``shared_down`` (HydraLoRA-like): shared ``A``, each expert owns its own ``B_i: r->d``.
    expert_allocation:
        ``progressive`` (few experts in the first and last layers, most in the middle), ``uniform``
        (``num_experts`` everywhere) or an explicit list with one count per decoder layer.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden_size: Optional[int] = None  # width of each expert's core; None -> lora_r
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router_noise: bool = True  # noisy top-k in training mode (Shazeer et al. 2017)
    expert_allocation: Union[str, List[int]] = "progressive"
    expert_type: str = "shared_core"
    scale_init: float = 1.0  # initial value of the per-layer learnable scale alpha_l
    use_gradient_checkpointing: bool = False
    quantization_4bit: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes that travel with the adapter

    def __post_init__(self):
        if isinstance(self.expert_allocation, tuple):
            self.expert_allocation = list(self.expert_allocation)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.num_experts, int) and self.num_experts >= 1,
             f"num_experts must be a positive integer, got {self.num_experts!r}.")
        need(isinstance(self.top_k, int) and self.top_k >= 1,
             f"top_k must be a positive integer, got {self.top_k!r}.")
        need(self.top_k <= self.num_experts,
             f"top_k={self.top_k} > num_experts={self.num_experts}: a token cannot pick more experts "
             f"than exist. Lower --top-k or raise --num-experts.")
        need(isinstance(self.lora_r, int) and self.lora_r >= 1,
             f"lora_r must be a positive integer (the rank of the experts), got {self.lora_r!r}.")
        need(self.expert_hidden_size is None or (isinstance(self.expert_hidden_size, int)
                                                 and self.expert_hidden_size >= 1),
             f"expert_hidden_size must be a positive integer or None, got {self.expert_hidden_size!r}.")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}.")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        need(self.router_aux_loss_coef >= 0, "router_aux_loss_coef must be >= 0.")
        need(self.router_z_loss_coef >= 0, "router_z_loss_coef must be >= 0.")
        need(self.expert_type in EXPERT_TYPES,
             f"unknown expert_type {self.expert_type!r}; choose one of {', '.join(EXPERT_TYPES)}.")
        alloc = self.expert_allocation
        if isinstance(alloc, str):
            need(alloc in ALLOCATIONS,
                 f"unknown expert_allocation {alloc!r}; choose 'progressive', 'uniform' or give a list "
                 f"with one expert count per layer.")
        else:
            need(isinstance(alloc, list) and len(alloc) > 0 and all(isinstance(n, int) for n in alloc),
                 f"expert_allocation must be 'progressive', 'uniform' or a list of integers, got {alloc!r}.")
            bad = [n for n in alloc if not self.top_k <= n <= self.num_experts]
            need(not bad, f"expert_allocation {alloc} has counts {bad} outside [top_k={self.top_k}, "
                          f"num_experts={self.num_experts}]; every layer needs at least top_k experts.")

    # ------------------------------------------------------------------ derived values
    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    @property
    def core_size(self) -> int:
        return self.expert_hidden_size or self.lora_r

    def experts_per_layer(self, num_layers: int) -> List[int]:
        """Number of experts in each decoder layer.

        ``progressive`` follows the seed on 16 layers (layers 0-1 get 4, layers 2-7 ramp 6->8, layers
        8-15 ramp 6->4) and scales the same shape to any depth by relative position.
        """
        alloc = self.expert_allocation
        if isinstance(alloc, list):
            if len(alloc) != num_layers:
                raise ConfigError(f"expert_allocation lists {len(alloc)} layers but the model has "
                                  f"{num_layers} decoder layers; give exactly one count per layer.")
            return list(alloc)
        if alloc == "uniform":
            return [self.num_experts] * num_layers
        high = self.num_experts
        if num_layers <= 2:
            return [high] * num_layers
        low = max(self.top_k, math.ceil(high / 2))
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

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ExpertConfig fields {unknown}; this adapter may come from a newer "
                              f"llama-expert. Upgrade the package.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_json_file(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json_string() + "\n")

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "ExpertConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
