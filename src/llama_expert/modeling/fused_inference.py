"""The decode fast path: one adapter's router and expert bank as a few fused operations, for inference.

Why: a decode step runs every adapter once per token. The general path (router module, ``Routing`` record,
gate matrix from indices, bank module, residual scale) costs about twice the operations a token needs, and on
a CPU each small operation runs just after the frozen MLP has streamed its weights through the cache, so the
adapters cost 0.1x of the base's decode speed at batch 1 (docs/results/decode-speed). The plan does what
inference needs and no more:

1. one matmul of ``h`` with the router's gate rows stacked on the bank's input rows (``[W_g; A; ...]`` h,
   float32, as the general path routes; ``RouterBase.inference_rows``, ``ExpertBank.inference_state``);
2. the router's logits (``RouterBase.inference_logits``: those rows of the product, or for a router that routes
   by its sequence's prefix mean, ``sequence_aux_free`` and ``prototype``, the logits of the means, with the pass's
   prefix state read and updated as the general path does) and its gates as a dense ``[N, E]`` matrix
   (``RouterBase.inference_gates``; with a null expert the router has one more column, which the bank never sees:
   its gate adds nothing);
3. the bank's output from its rows of that product and the gates (``ExpertBank.inference_output``), with
   ``alpha_l * lora_alpha / r`` folded into its last weight.

On a CPU, where the router and bank also have a kernel form (``RouterBase.kernel_routing``,
``ExpertBank.kernel_form``) and the compiled decode kernel builds (modeling/decode_kernel.py), all three steps
and the residual add are one C call instead.

The derived tensors are rebuilt whenever a source parameter changes: in place (its version counter moves),
moved (its storage), replaced (its identity, or the router's or bank's), and after any optimiser step (a fused
AdamW step leaves versions as they were) or a switch to training mode. A write through ``.data`` bypasses all of
these: after one, set ``adapter.inference_plan = None`` (or call ``model.train()`` / ``model.eval()``).
A bank that computes the whole layer (mixlora, ``computes_mlp``) has no PyTorch form here: its plan is its compiled
kernel alone (``LayerKernel``: the frozen projections by PyTorch, then routing and the chosen experts in one C call,
``ExpertBank.kernel_layer_output``), and without the kernel it keeps its one-pass general path. A router whose eval
routing depends on other sequences of the batch (expert choice) or needs labels (oracle) has no inference form,
and its adapter keeps the general path. The adapter uses the plan only in eval mode, without gradients, autocast
or routing statistics; tests pin it to the general path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn

from .decode_kernel import DecodeKernel, LayerKernel, kernel_library


_OPTIMIZER_STEPS = [0]  # every optimiser step anywhere: a fused AdamW step leaves parameter versions unchanged


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


class FusedInference:
    """The inference plan of one ``MoEAdapter`` (read through the adapter on every call, so that a replaced router,
    bank or parameter is seen)."""

    def __init__(self, adapter: nn.Module):
        self.adapter = adapter
        self.key: Optional[Tuple] = None
        self.weight: Optional[torch.Tensor] = None
        self.state = None
        self.num_gates = 0
        self.num_real = 0  # the bank's experts: the gates beyond them (a null expert's) are dropped
        self.router = self.bank = None
        self.kernel: Optional[DecodeKernel] = None

    def __deepcopy__(self, memo) -> None:
        """A copied (or pickled) adapter derives its own plan on first use: this one's kernel points at tensors
        derived from the original's parameters, and ctypes structures cannot be copied."""
        return None

    def __reduce__(self):
        return type(None), ()

    def ready(self) -> bool:
        """Whether this router and bank have an inference form; (re)derives the fused tensors when stale."""
        adapter = self.adapter  # its module and parameter dicts directly: this runs once per layer per decode step
        router, bank, scale = adapter._modules["router"], adapter._modules["experts"], adapter._parameters["residual_scale"]
        if not router.has_inference_gates:
            return False
        # the parameters as the modules hold them now; routers and banks keep theirs directly (``_parameters``:
        # four times cheaper than ``parameters()``, which matters once per layer per token)
        sources = (*router._parameters.values(), *bank._parameters.values(), scale)
        key = [id(router), id(bank), _OPTIMIZER_STEPS[0],
               *[(id(p), p.data_ptr(), p._version) for p in sources if p is not None]]
        if key != self.key:
            self.key = None  # until the new tensors are built (a failed build must not leave a matching key)
            with torch.no_grad():
                alpha = scale.detach().float()
                form = bank.inference_state(alpha)
                input_rows, self.state = form if form is not None else (None, None)
                gates = router.inference_rows()  # None: a prefix-mean router's logits are not of each token's h
                parts = [rows.detach().float() for rows in (gates, input_rows) if rows is not None]
                self.num_gates, self.num_real = (0 if gates is None else gates.shape[0]), bank.num_experts
                self.weight = torch.cat(parts) if parts else None
                self.router, self.bank = router, bank
                whole_layer = bank.computes_mlp  # its plan is its compiled kernel alone (a ``LayerKernel``)
                self.kernel = self.compiled_kernel(router, bank, alpha) if self.state is not None or whole_layer \
                    else None
            self.key = key
        return self.state is not None or self.kernel is not None

    def compiled_kernel(self, router, bank, alpha: torch.Tensor) -> Optional[DecodeKernel]:
        if not self.adapter.decode_kernel or router.weight.device.type != "cpu":
            return None
        routing, form = router.kernel_routing(), bank.kernel_form(alpha)
        library = kernel_library() if routing is not None and form is not None else None
        if library is None:
            return None
        kind = LayerKernel if bank.computes_mlp else DecodeKernel
        return kind(library, routing, form, bank.num_experts, self.adapter.token_mask, router, float(alpha))

    def add_to(self, base: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``base + alpha_l * MoE(hidden)``: the compiled kernel where it takes these tensors, else PyTorch."""
        kernel = self.kernel
        if kernel is not None and kernel.accepts(hidden, base):
            return kernel(hidden, base)
        moe = self(hidden)
        return base + (moe if moe.dtype == base.dtype else moe.to(base.dtype)).view(base.shape)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapter's ``alpha_l * MoE(h)`` [N, d] for a pass's ``hidden`` [B, T, d] (or [N, d]) states (computed
        in float32; a prefix-mean router reads and updates the pass's prefix state, as the general path does)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat = flat if flat.dtype == torch.float32 else flat.float()
        projected = F.linear(flat, self.weight) if self.weight is not None else flat[:, :0]
        logits = self.router.inference_logits(projected[:, :self.num_gates], hidden, self.adapter.token_mask)
        gates = self.router.inference_gates(logits)
        if self.num_real != self.num_gates:
            gates = gates[:, :self.num_real]  # the null expert's column: its output is zero
        rows = projected[:, self.num_gates:] if projected.shape[1] > self.num_gates else flat
        return self.bank.inference_output(rows, gates, self.state)
