"""The decode fast path: one adapter's router and expert bank as a few fused operations, for inference.

Why: a decode step runs every adapter once per token. The general path (router module, ``Routing`` record,
gate matrix from indices, bank module, residual scale) costs about twice the operations a token needs, and on
a CPU each small operation runs just after the frozen MLP has streamed its weights through the cache, so the
adapters cost 0.1x of the base's decode speed at batch 1 (docs/results/decode-speed). The plan does what
inference needs and no more:

1. one matmul of ``h`` with the router's gate rows stacked on the bank's input rows (``[W_g; A; ...]`` h,
   float32, as the general path routes; ``ExpertBank.inference_input_weight``);
2. the router's gates as a dense ``[N, E]`` matrix (``RouterBase.inference_gates``);
3. the bank's output from its rows of that product and the gates (``ExpertBank.inference_output``), with
   ``alpha_l * lora_alpha / r`` folded into its last weight.

The derived tensors are rebuilt whenever a source parameter changes: in place (its version counter moves),
moved (its storage), or replaced (its identity), so training steps, loading, pruning and ``.to()`` never meet
a stale plan.
A router whose eval routing is not a function of each token alone (expert choice), or a bank that reads the
frozen MLP (mixlora), has no inference form, and its adapter keeps the general path. The adapter uses the plan
only in eval mode, without gradients, autocast or routing statistics; tests pin it to the general path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class FusedInference:
    def __init__(self, router: nn.Module, bank: nn.Module, residual_scale: nn.Parameter):
        self.router, self.bank, self.residual_scale = router, bank, residual_scale
        self.key: Optional[Tuple] = None
        self.weight: Optional[torch.Tensor] = None
        self.state = None
        self.num_gates = 0

    def ready(self) -> bool:
        """Whether this router and bank have an inference form; (re)derives the fused tensors when stale."""
        # the parameters as the modules hold them now (a replaced one is seen too); routers and banks keep theirs
        # directly (``_parameters``: four times cheaper than ``parameters()``, which matters once per layer per token)
        sources = (*self.router._parameters.values(), *self.bank._parameters.values(), self.residual_scale)
        key = tuple((id(p), p.data_ptr(), p._version) for p in sources if p is not None)
        if key != self.key:
            self.key = key
            with torch.no_grad():
                form = self.bank.inference_state(self.residual_scale.detach().float())
                input_rows, self.state = form if form is not None else (None, None)
                gates = self.router.weight.detach().float()
                self.num_gates = gates.shape[0]
                self.weight = gates if input_rows is None else torch.cat([gates, input_rows.float()])
        return self.state is not None and self.router.has_inference_gates

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """The adapter's ``alpha_l * MoE(h)`` for ``flat`` [N, d] hidden states (computed in float32)."""
        flat = flat if flat.dtype == torch.float32 else flat.float()
        projected = F.linear(flat, self.weight)
        gates = self.router.inference_gates(projected[:, :self.num_gates])
        rows = projected[:, self.num_gates:] if projected.shape[1] > self.num_gates else flat
        return self.bank.inference_output(rows, gates, self.state)
