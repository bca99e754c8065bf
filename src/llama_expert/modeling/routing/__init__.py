"""Routers: one module per strategy, registered by name, plus the losses they share.

Every router is built as ``ROUTERS.get(name).from_config(hidden_size, num_experts, config)`` and returns
a ``Routing`` for a ``[N, d]`` batch of tokens. Routers must be causal: a token's choice may depend on
that token's hidden state only (tests check it for every registered router). ``RouterBase`` holds what
they share (float32, losses, routing statistics).
"""

from .aux_free import AuxFreeRouter
from .base import RouterBase
from .expert_choice import ExpertChoiceRouter
from .losses import Routing, load_balancing_loss, router_z_loss
from .noisy_topk import NoisyTopKGating
from .registry import ROUTERS, register_router
from .soft import SoftRouter
from .switch import SwitchRouter

__all__ = ["ROUTERS", "register_router", "Routing", "RouterBase", "NoisyTopKGating", "SwitchRouter",
           "AuxFreeRouter", "SoftRouter", "ExpertChoiceRouter", "load_balancing_loss", "router_z_loss"]
