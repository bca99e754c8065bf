"""RouterBase: what every router shares (docs/design.md section 2).

- float32 routing with autocast switched off around it (``forward`` casts and calls ``_route``);
- the losses of the last pass (``aux_loss``, ``z_loss``; None after an eval-mode pass under ``no_grad``);
- the routing statistics ``metrics.routing`` reads: ``record_statistics``, ``expert_counts``,
  ``entropy_sum``, ``tokens_seen``, ``reset_statistics``;
- ``top_k``: the number of experts each token gets (columns of ``Routing.indices``).

A subclass implements ``_route(hidden [N, d] float32, mask [N] bool or None) -> Routing``, sets the two
losses (``set_losses``) and calls ``record`` when ``record_statistics`` is on.

``MoEAdapter`` calls ``route_sequences(hidden [B, T, d], context)``, which flattens the tokens for ``forward``. A
router whose choice depends on the token's sequence rather than on the token alone overrides it and sets
``sequence_level``: it gets the hidden states with their batch and sequence axes and the model's pass context
(``modeling.adapter.TokenMask``: the padding mask of these tokens, the prefix sums that earlier passes of the same
sequences left, the domain labels).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..per_expert import Transfer, select_rows
from .losses import Routing, router_z_loss


def in_backward_pass() -> bool:
    """True while autograd runs a backward pass (gradient checkpointing recomputing the forward): routers
    that update a buffer after each training pass (aux_free, expert_choice) skip the update then."""
    current = getattr(torch._C, "_current_graph_task_id", None)  # no public API says this; guarded
    return current is not None and current() != -1


class RouterBase(nn.Module):
    DEFAULT_INIT_SCALE = 0.1  # W_g std = 0.1 / sqrt(d): early routing is near uniform (ExpertConfig's default)
    per_expert_parameters: tuple = ("weight",)  # one row per expert (what select_experts slices)
    has_inference_gates = False  # True where ``inference_gates`` gives eval routing per token (the decode fast path)
    sequence_level = False  # True: ``route_sequences`` routes by the sequence (the model then keeps a prefix state)

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} > num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.record_statistics = False  # switched on by metrics.routing while it measures expert usage
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64), persistent=False)

    @staticmethod
    def gate_weight(hidden_size: int, num_experts: int) -> nn.Parameter:
        """The router matrix ``W_g`` [E, d], float32, small (std 0.1 / sqrt(d)): early routing is near uniform."""
        weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(weight, std=hidden_size ** -0.5 * RouterBase.DEFAULT_INIT_SCALE)
        return weight

    def init_gate(self, scale: float) -> None:
        """Re-draw ``W_g`` with std ``scale / sqrt(d)`` (``ExpertConfig.router_init_scale``; 0 gives zeros)."""
        with torch.no_grad():
            self.weight.normal_(std=self.weight.shape[1] ** -0.5 * scale) if scale > 0 else self.weight.zero_()

    @property
    def min_experts(self) -> int:
        """The fewest experts this router can route among (pruning keeps at least this many): ``top_k``."""
        return self.top_k

    def select_experts(self, index: torch.Tensor) -> List[Transfer]:
        """New expert j is old expert ``index[j]``: its rows of every per-expert tensor. Dropping experts lets
        the gates renormalise over the rest by themselves (a softmax over fewer logits). Resets the statistics."""
        if index.numel() < self.min_experts:
            raise ValueError(f"keeping {index.numel()} experts leaves fewer than top_k={self.min_experts}")
        transfers = select_rows(self, self.per_expert_parameters, index)
        self.num_experts = int(index.numel())
        self.expert_counts = self.expert_counts.new_zeros(self.num_experts)
        self.reset_statistics()
        return transfers

    def reset_statistics(self) -> None:
        self.expert_counts.zero_()
        self.entropy_sum.zero_()
        self.tokens_seen.zero_()

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Routing:
        if torch.is_autocast_enabled(hidden.device.type):
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                return self._route(hidden.float(), mask)
        return self._route(hidden.float(), mask)

    def _route(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Routing:
        raise NotImplementedError

    def route_sequences(self, hidden: torch.Tensor, context) -> Routing:
        """Routing of a forward pass's ``hidden`` [B, T, d] (or [N, d]; rows in the flat order ``b * T + t``): what
        ``MoEAdapter`` calls. A per-token router routes the flat tokens with the pass's padding mask.

        Why a second entry point: a ``sequence_level`` router needs the sequence axis, which the flat [N, d] batch
        of ``forward`` has lost, and what the pass knows beyond the hidden states. ``context`` (the model's
        ``TokenMask``) gives the padding mask of these tokens (``for_hidden``), the state earlier passes of these
        sequences left (``prefix``, a ``PrefixState`` or None) and the sequences' domain labels
        (``domain_labels``). A router must stay causal: token t may depend on tokens 0..t of its own sequence."""
        return self(hidden.reshape(-1, hidden.shape[-1]), context.for_hidden(hidden) if context is not None else None)

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        """Eval routing as a dense [N, E] gate matrix from the clean logits ``h W_g`` [N, E] (float32): what
        ``forward`` gives in eval mode, per token, without losses or statistics (``modeling.fused_inference``)."""
        raise NotImplementedError(f"{type(self).__name__} routes by more than each token's logits")

    def kernel_routing(self) -> Optional[Tuple[int, Optional[torch.Tensor], bool]]:
        """Eval routing as the compiled decode kernel runs it (modeling/decode_kernel.c): ``(top_k, bias,
        normalise_all)`` = the top-k experts of ``logits + bias`` (bias None: none), gated by the softmax of their
        logits (``normalise_all``: each one's probability under the softmax of all E). None: this router's
        routing is not of that form, and its adapters use the PyTorch fused path."""
        return None

    def need_losses(self) -> bool:
        """Losses are computed in training mode or with gradients on; inference under no_grad needs none."""
        return self.training or torch.is_grad_enabled()

    def need_probs(self) -> bool:
        """Whether this pass needs the softmax over all E logits (for the losses or the statistics)."""
        return self.need_losses() or self.record_statistics

    def all_probs(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        return F.softmax(logits, dim=-1) if self.need_probs() else None

    def set_losses(self, aux_loss: Callable[[], torch.Tensor], logits: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> None:
        """Keep ``aux_loss()`` and the z-loss of the clean ``logits``; both None when no loss is needed."""
        if self.need_losses():
            self.aux_loss, self.z_loss = aux_loss(), router_z_loss(logits, mask)
        else:
            self.aux_loss = self.z_loss = None

    @torch.no_grad()
    def record_chosen(self, chosen: torch.Tensor, probs: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """``record`` for routers that list every expert with gate 0 where not chosen: ``chosen`` [N, E] bool."""
        if mask is not None:
            chosen, probs = chosen[mask], probs[mask]
        self.expert_counts += chosen.sum(dim=0).double()
        self.entropy_sum += torch.special.entr(probs).sum().double()
        self.tokens_seen += chosen.shape[0]

    @torch.no_grad()
    def record(self, indices: torch.Tensor, probs: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        if mask is not None:
            indices, probs = indices[mask], probs[mask]
        self.expert_counts += torch.bincount(indices.reshape(-1), minlength=self.num_experts).double()
        self.entropy_sum += torch.special.entr(probs).sum().double()
        self.tokens_seen += indices.shape[0]
