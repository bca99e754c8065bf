"""Floor 1: the MoE adapter as plain torch modules (no Transformers, Accelerate, PEFT or matplotlib).

Routers, expert banks and allocation rules are registered by name; ``check_config`` tells, before any
model is loaded, whether an ``ExpertConfig`` names strategies that exist.
"""

from .adapter import MoEAdapter, TokenMask
from .allocation import ALLOCATIONS, experts_per_layer
from .experts import EXPERT_BANKS, ExpertBank, MixLoRAExperts, SharedCoreExperts, SharedDownExperts, gate_matrix
from .lora_experts import LoRAExperts  # registers lora_experts
from .routing import ROUTERS, NoisyTopKGating, Routing, load_balancing_loss, router_z_loss


def check_config(config) -> None:
    """Raise ConfigError when ``config`` names a router, expert bank or allocation that is not registered,
    or asks a bank for an ``expert_init`` it does not support."""
    ROUTERS.get(config.router_type)
    EXPERT_BANKS.get(config.expert_type).check_config(config)  # e.g. an expert_init the bank does not support
    if isinstance(config.expert_allocation, str):
        ALLOCATIONS.get(config.expert_allocation)


__all__ = ["MoEAdapter", "TokenMask", "ALLOCATIONS", "experts_per_layer", "EXPERT_BANKS", "ExpertBank",
           "MixLoRAExperts", "SharedCoreExperts", "SharedDownExperts", "LoRAExperts", "gate_matrix", "ROUTERS",
           "NoisyTopKGating", "Routing", "load_balancing_loss", "router_z_loss", "check_config"]
