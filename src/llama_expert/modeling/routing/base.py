"""RouterBase: what every router shares (docs/design.md section 2).

- float32 routing with autocast switched off around it (``forward`` casts and calls ``_route``);
- the losses of the last pass (``aux_loss``, ``z_loss``; None after an eval-mode pass under ``no_grad``);
- the routing statistics ``metrics.routing`` reads: ``record_statistics``, ``expert_counts``,
  ``entropy_sum``, ``tokens_seen``, ``reset_statistics``, and ``decisions`` (each pass's ``Routing``, kept by
  ``MoEAdapter`` while it is a list);
- ``top_k``: the number of experts each token gets (columns of ``Routing.indices``);
- what ``build`` adds to any router from ``ExpertConfig``: a null expert (``null_expert``: one more choice, the
  last, whose output is zero and which takes no part in balancing), the window the balancing statistics are
  kept over (``balance_window``, ``window.py``) and the registered extra losses whose coefficient is set.

A subclass implements ``_route(hidden [N, d] float32, mask [N] bool or None) -> Routing`` over
``num_experts`` choices (the null's included), sets the losses (``set_losses``; the load to balance from
``balance_load``) and calls ``record`` when ``record_statistics`` is on.

``MoEAdapter`` calls ``route_sequences(hidden [B, T, d], context)``, which flattens the tokens for ``forward``. A
router whose choice depends on the token's sequence rather than on the token alone overrides it and sets
``sequence_level``: it gets the hidden states with their batch and sequence axes and the model's pass context
(``modeling.adapter.TokenMask``: the padding mask of these tokens, the prefix sums that earlier passes of the same
sequences left, the domain labels).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..decode_kernel import KernelRouting
from ..per_expert import Transfer, select_rows
from .losses import ROUTER_LOSSES, Routing, global_load, load_balancing_loss, router_z_loss
from .window import LoadWindow


def in_backward_pass() -> bool:
    """True while autograd runs a backward pass (gradient checkpointing recomputing the forward): routers
    that update a buffer after each training pass (aux_free, expert_choice) skip the update then. Inside a compiled
    graph the answer is False: dynamo cannot trace the private call, and the compiled training path
    (training/compilation.py) runs without gradient checkpointing."""
    if torch.compiler.is_compiling():
        return False
    current = getattr(torch._C, "_current_graph_task_id", None)  # no public API says this; guarded
    return current is not None and current() != -1


def chosen_gates(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[N, k] gates of the chosen experts ``indices``: the softmax over their ``logits`` (they sum to 1).

    With one expert chosen that softmax is the constant 1, whose gradient is zero: the router would never learn
    from the language-model loss (only from its own losses, which say nothing about which expert helps). So a
    single gate is a straight-through gate: its value stays exactly 1 (the forward pass, and every adapter saved
    before, are unchanged), and the backward pass carries the gradient of the chosen expert's probability under
    the softmax over all choices, as Switch Transformer's gate ``p_i`` does: the router raises the probability of
    an expert whose output lowers the loss, and lowers it otherwise."""
    gates = torch.softmax(logits.gather(1, indices), dim=-1)
    if indices.shape[1] == 1 and logits.requires_grad:
        chosen = torch.softmax(logits, dim=-1).gather(1, indices)
        gates = gates + (chosen - chosen.detach())  # + exactly 0 in value
    return gates


class RouterBase(nn.Module):
    DEFAULT_INIT_SCALE = 0.1  # W_g std = 0.1 / sqrt(d): early routing is near uniform (ExpertConfig's default)
    per_expert_parameters: tuple = ("weight",)  # one row per choice, a null expert's last (what select_experts slices)
    real_expert_parameters: tuple = ()  # one row per real expert, none for a null expert (sliced alike)
    has_inference_gates = False  # True where ``inference_gates`` gives eval routing (the decode fast path)
    sequence_level = False  # True: ``route_sequences`` routes by the sequence (the model then keeps a prefix state)
    null_choices = 0  # 1 with a null expert (``build``): the last of the ``num_experts`` choices

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} > num_experts={num_experts}")
        self.num_experts = num_experts  # choices: with a null expert, the experts and the null
        self.top_k = top_k
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.extra_losses: Dict[str, torch.Tensor] = {}  # the registered losses of ``loss_terms``, last pass
        self.loss_terms: Dict[str, Callable] = {}
        self.record_statistics = False  # switched on by metrics.routing while it measures expert usage
        self.decisions: Optional[List[Routing]] = None  # a list (metrics.routing): MoEAdapter appends each Routing
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.load_window = LoadWindow(num_experts)  # window 0: each pass alone
        self.pass_sequences = 1  # sequences in the current pass (``forward``): the window decays by them
        self.pass_counts: Optional[torch.Tensor] = None  # [N]: the current pass's prefix lengths (``forward``)

    @classmethod
    def build(cls, hidden_size: int, num_experts: int, config) -> "RouterBase":
        """The router of a layer of ``num_experts`` experts, as ``MoEAdapter`` builds it: ``from_config`` with one
        more choice for a null expert (``config.null_expert``), balancing over ``config.balance_window`` sequences,
        and the registered losses whose coefficient is above 0."""
        null = int(config.null_expert)
        router = cls.from_config(hidden_size, num_experts + null, config)
        router.null_choices = null
        router.load_window = LoadWindow(num_experts, config.balance_window)
        router.loss_terms = {name: loss for name, (field, loss) in ROUTER_LOSSES.items() if getattr(config, field) > 0}
        return router

    @property
    def real_experts(self) -> int:
        """The choices that are experts (all but a null expert): what the bank computes and balancing balances."""
        return self.num_experts - self.null_choices

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
        """New expert j is old expert ``index[j]``: its rows of every per-expert tensor (a null expert stays, last).
        Dropping experts lets the gates renormalise over the rest by themselves (a softmax over fewer logits).
        Resets the statistics; each expert keeps its balancing window."""
        if index.numel() < self.min_experts:
            raise ValueError(f"keeping {index.numel()} experts leaves fewer than top_k={self.min_experts}")
        self.load_window.select(index)
        index = torch.cat([index, torch.arange(self.real_experts, self.num_experts, dtype=index.dtype)])
        transfers = select_rows(self, self.per_expert_parameters, index)
        transfers += select_rows(self, self.real_expert_parameters, index[:index.numel() - self.null_choices])
        self.num_experts = int(index.numel())
        self.expert_counts = self.expert_counts.new_zeros(self.num_experts)
        self.reset_statistics()
        return transfers

    def reset_statistics(self) -> None:
        self.expert_counts.zero_()
        self.entropy_sum.zero_()
        self.tokens_seen.zero_()

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None, sequences: int = 1,
                counts: Optional[torch.Tensor] = None) -> Routing:
        """Route ``hidden`` [N, d] (``mask`` [N]: False for padding), the tokens of ``sequences`` sequences; for a
        router of prefix means, ``hidden`` holds the means and ``counts`` [N] their prefixes' lengths."""
        self.pass_sequences, self.pass_counts = sequences, counts
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
        mask = context.for_hidden(hidden) if context is not None else None
        return self(hidden.reshape(-1, hidden.shape[-1]), mask, hidden.shape[0] if hidden.dim() == 3 else 1)

    def inference_rows(self) -> Optional[torch.Tensor]:
        """The rows whose product with each token's ``h`` gives this router's logits (``W_g`` [E, d]): the fused
        plan stacks them on the bank's input rows, one matmul for both. None: the logits are of more than the token
        (``inference_logits`` makes them)."""
        return self.weight

    def inference_logits(self, projected: torch.Tensor, hidden: torch.Tensor, context) -> torch.Tensor:
        """[N, E] eval logits for the fused plan: ``projected`` is ``h`` times ``inference_rows`` ([N, 0] where
        that is None), ``hidden`` the pass's [B, T, d] (or [N, d]) hidden states and ``context`` its ``TokenMask``."""
        return projected

    def inference_gates(self, logits: torch.Tensor) -> torch.Tensor:
        """Eval routing as a dense [N, E] gate matrix from the clean logits (``inference_logits``, float32): what
        ``forward`` gives in eval mode, without losses or statistics (``modeling.fused_inference``)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-pass inference form of its routing")

    def kernel_routing(self) -> Optional[KernelRouting]:
        """Eval routing as the compiled decode kernel runs it (modeling/decode_kernel.c, ``KernelRouting``): the
        top-k experts of ``logits + bias``, gated by the softmax of their logits, the logits made by a registered C
        form (``linear``: ``W_g x``; ``prototype``) of the token's ``h`` or of its sequence's prefix mean. None:
        this router's routing is not of that form, and its adapters use the PyTorch fused path."""
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
        """Keep ``aux_loss()``, the z-loss of the clean ``logits`` and the registered ``loss_terms`` of them; None
        (and no extra losses) when no loss is needed."""
        if self.need_losses():
            self.aux_loss, self.z_loss = aux_loss(), router_z_loss(logits, mask)
            self.extra_losses = {name: loss(logits, mask, self.real_experts) for name, loss in self.loss_terms.items()}
        else:
            self.aux_loss = self.z_loss = None
            self.extra_losses = {}

    def bank_routing(self, routing: Routing) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(indices, gates)`` for the expert bank, which computes the real experts only: a slot that chose the
        null expert becomes expert 0 with gate 0 (adding nothing; ``gate_matrix`` sums repeated experts). The null's
        gate mass is simply missing from the real experts' sum."""
        if not self.null_choices:
            return routing.indices, routing.gates
        null = routing.indices >= self.real_experts
        return routing.indices.masked_fill(null, 0), routing.gates.masked_fill(null, 0.0)

    def balancing_loss(self, probs: torch.Tensor, indices: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The load-balancing loss of this pass over the real experts, its ``f_i`` from ``balance_load``."""
        counts = self.balance_load(indices, mask, probs.dtype)
        return load_balancing_loss(probs, indices, self.real_experts, mask, counts)

    def balance_load(self, indices: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """[real_experts] the assignments the balancing acts on: this pass's non-padding ones to the real experts,
        summed over the data-parallel ranks (``losses.global_sums``), over the window (``LoadWindow``)."""
        counts, sequences = global_load(indices, mask, self.num_experts, self.real_experts, dtype,
                                        self.pass_sequences)
        return self.load_window(counts, sequences, recomputing=in_backward_pass())

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
