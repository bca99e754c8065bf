"""Routers: one module per strategy, registered by name, plus the losses they share.

Every router is built as ``ROUTERS.get(name).from_config(hidden_size, num_experts, config)`` and returns
a ``Routing`` for a ``[N, d]`` batch of tokens, or, for a ``sequence_level`` router, for ``[B, T, d]`` hidden
states and the pass context (``route_sequences``). Routers must be causal: a token's choice may depend on that
token's hidden state, and a sequence router's on the tokens before it in its sequence, never on later tokens or
other sequences (tests check it for every registered router). ``RouterBase`` holds what they share (float32,
losses, routing statistics).
"""

from .aux_free import AuxFreeRouter
from .base import RouterBase
from .expert_choice import ExpertChoiceRouter
from .losses import Routing, load_balancing_loss, router_z_loss
from .noisy_topk import NoisyTopKGating
from .oracle import OracleRouter
from .prefix_state import PrefixState, StaticPrefixState
from .prototype import PrototypeRouter
from .registry import ROUTERS, register_router
from .sequence_aux_free import SequenceAuxFreeRouter
from .soft import SoftRouter
from .switch import SwitchRouter

__all__ = ["ROUTERS", "register_router", "Routing", "RouterBase", "NoisyTopKGating", "SwitchRouter",
           "AuxFreeRouter", "SoftRouter", "ExpertChoiceRouter", "SequenceAuxFreeRouter", "OracleRouter",
           "PrototypeRouter", "PrefixState", "StaticPrefixState", "load_balancing_loss", "router_z_loss"]
