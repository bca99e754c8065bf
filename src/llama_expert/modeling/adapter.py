"""MoEAdapter: the frozen MLP of one decoder layer plus a routed expert bank, ``y = MLP(h) + a_l*MoE(h)``.

``a_l`` is ``residual_scale``, a learnable scalar per layer, stored with shape [1] (docs/design.md section 1).

The adapter replaces ``layer.mlp`` and keeps the original module inside it (``base_mlp``), so removing
it gives back the very same MLP object. The padding mask (and, for sequence routers, the prefix state and the
domain labels) reaches the router through a small shared ``TokenMask`` that forward hooks on the whole model fill;
Transformers itself is not patched.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..config import ExpertConfig
from .experts import EXPERT_BANKS
from .decode_kernel import DecodeKernel
from .fused_inference import FusedInference
from .per_expert import Transfer
from .routing import ROUTERS, PrefixState


class TokenMask:
    """What the current forward pass tells the routers, shared by every adapter of a model: the attention mask,
    and for sequence-level routers (``RouterBase.sequence_level``) the ``PrefixState`` that earlier passes of the
    same sequences left (``prefix``, set per pass by ``integration.prefix_cache``) and the sequences' domain labels
    (``domain_labels``, set by ``integration.surgery.domain_labels``).

    The flat mask is worked out once per forward pass (by the first layer) and reused by the others:
    in decoding, per-layer mask handling would cost as much as the router itself.
    """

    def __init__(self):
        self.attention_mask: Optional[torch.Tensor] = None
        self.prefix: Optional[PrefixState] = None
        self.domain_labels = None  # [B] domain index per sequence, an int for every sequence, or None
        self._key = None
        self._flat: Optional[torch.Tensor] = None

    def set(self, mask: Optional[torch.Tensor]) -> None:
        self.attention_mask = mask if isinstance(mask, torch.Tensor) else None
        self._key = None

    def for_hidden(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Flat boolean mask [B*T] matching ``hidden`` [B, T, d], or None when there is no padding.

        Inside a compiled graph the mask is returned as it is, padding or not: asking whether it holds any padding
        reads it back to the host, which a CUDA graph cannot do, and every router routes alike with a mask of
        ones and with none (the cache of the eager path is a Python-side shortcut a graph does not need)."""
        mask = self.attention_mask
        if mask is None or mask.dim() not in (2, 4) or hidden.dim() != 3:
            return None
        if torch.compiler.is_compiling():
            return self._flatten_static(mask, hidden.shape[0], hidden.shape[1], hidden.device)
        return self.for_shape(hidden.shape[0], hidden.shape[1], hidden.device)

    def for_shape(self, batch: int, length: int, device: torch.device) -> Optional[torch.Tensor]:
        """``for_hidden`` of hidden states [batch, length, d] on ``device``, in eager mode (cached per shape)."""
        mask = self.attention_mask
        if mask is None or mask.dim() not in (2, 4):
            return None
        key = (batch, length, device)
        if key != self._key:
            self._key, self._flat = key, self._flatten(mask, batch, length, device)
        return self._flat

    @staticmethod
    def _flatten(mask: torch.Tensor, batch: int, length: int, device: torch.device) -> Optional[torch.Tensor]:
        flat = TokenMask._flatten_static(mask, batch, length, device)
        return None if flat is None or bool(flat.all()) else flat

    @staticmethod
    def _flatten_static(mask: torch.Tensor, batch: int, length: int, device: torch.device) -> Optional[torch.Tensor]:
        """The mask of the pass's tokens, decided by shapes alone (no host read). A 4-D mask [B, 1, T, K] (what
        Transformers passes with a static KV cache, boolean or additive) marks a padding token by a row that attends to
        nothing: its own key is padding, and so is every key before it."""
        if mask.dim() == 4:
            if mask.shape[0] != batch or mask.shape[2] < length:
                return None
            rows = mask[:, 0, -length:]
            return (rows if rows.dtype == torch.bool else rows == 0).any(dim=-1).to(device).reshape(-1)
        if mask.shape[0] != batch or mask.shape[1] < length:
            return None
        return mask[:, -length:].to(device=device, dtype=torch.bool).reshape(-1)  # with a KV cache: new tokens


class MoEAdapter(nn.Module):
    def __init__(self, base_mlp: nn.Module, hidden_size: int, num_experts: int, config: ExpertConfig,
                 token_mask: Optional[TokenMask] = None):
        super().__init__()
        self.base_mlp = base_mlp
        self.num_experts = num_experts
        self.token_mask = token_mask or TokenMask()
        self.router = ROUTERS.get(config.router_type).build(hidden_size, num_experts, config)  # (+ a null expert)
        if config.router_init_scale != self.router.DEFAULT_INIT_SCALE:  # else keep the router's own draw, so that
            self.router.init_gate(config.router_init_scale)               # a seed gives the adapters it always gave
        bank = EXPERT_BANKS.get(config.expert_type)
        self.experts = bank.from_config(hidden_size, num_experts, config, base_mlp=base_mlp)
        # alpha_l starts where the bank says (0 for shared_down's "distinct" init, else residual_scale_init)
        # shape [1], not a 0-d scalar: FSDP2's fully_shard cannot shard a tensor without a dimension
        self.residual_scale = nn.Parameter(torch.tensor([bank.initial_residual_scale(config)]))
        self.fused_inference = True  # the decode fast path in eval without gradients (False: the general path)
        self.decode_kernel = True  # on a CPU, the fused path as one compiled call (modeling/decode_kernel.py)
        self.inference_plan: Optional[FusedInference] = None  # built on first use, dropped when experts change
        # the compiled kernel for the model forward pass in progress, set and cleared by the model's hooks
        # (integration.surgery): checked once per pass for all layers, instead of once per layer
        self.pass_kernel: Optional[DecodeKernel] = None

    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        return self.router.aux_loss

    @property
    def z_loss(self) -> Optional[torch.Tensor]:
        return self.router.z_loss

    def select_experts(self, index) -> List[Transfer]:
        """New expert j of this layer is old expert ``index[j]`` (router rows and expert tensors alike)."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.num_experts:
            raise ValueError(f"expert indices must lie in 0..{self.num_experts - 1}, got {index.tolist()}")
        transfers = self.router.select_experts(index) + self.experts.select_experts(index)
        self.num_experts = int(index.numel())
        self.inference_plan = None  # the per-expert parameters are new tensors
        return transfers

    def keep_experts(self, keep) -> List[Transfer]:
        """Keep experts ``keep`` of this layer and drop the others (pruning)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        if keep.numel() == 0 or len(set(keep.tolist())) != keep.numel():
            raise ValueError(f"keep must list distinct experts of 0..{self.num_experts - 1}, got {keep.tolist()}")
        return self.select_experts(keep)

    @torch.no_grad()
    def split_expert(self, expert: int, noise: float, generator: torch.Generator) -> List[Transfer]:
        """Append a copy of ``expert`` whose per-expert rows (router row included) are perturbed by Gaussian
        noise of ``noise`` times each row's standard deviation, so that the two can drift apart."""
        transfers = self.select_experts(list(range(self.num_experts)) + [expert])
        for _, new, _ in transfers:
            row = new[self.num_experts - 1]  # the copy (a router's null expert, if any, stays after it)
            spread = float(row.float().std()) if row.numel() > 1 else 0.0
            if spread > 0 and new.requires_grad:
                row.add_(torch.randn(row.shape, generator=generator, dtype=torch.float32).to(row) * noise * spread)
        return transfers

    def train(self, mode: bool = True) -> "MoEAdapter":
        self.inference_plan = None  # rebuilt from the parameters as they are at the next inference pass
        return super().train(mode)

    def use_fused_inference(self, hidden: torch.Tensor) -> bool:
        """Eval, no gradients, no autocast, no statistics being recorded, and a router and bank with an
        inference form (modeling/fused_inference.py): the fast path gives what the general path gives."""
        return self.fused_inference_ready("cpu" if hidden.is_cpu else hidden.device.type)

    def fused_inference_ready(self, device_type: str) -> bool:
        if not self.fused_inference or self.training or torch.is_grad_enabled():
            return False
        if self._modules["router"].record_statistics or torch.is_autocast_enabled(device_type):
            return False  # (checked once per layer per decode step: the module dicts directly, without __getattr__)
        plan = self.inference_plan
        if plan is None:
            plan = self.inference_plan = FusedInference(self)
        return plan.ready()

    def kernel_for_pass(self, shape: Optional[Tuple[int, int]] = None) -> Optional[DecodeKernel]:
        """The compiled kernel to run for a whole model forward pass, or None: the model's pre-hook asks once per
        pass (integration.surgery), so that each layer skips the checks above. On a CPU each check costs several
        times its in-cache time, because it runs right after the frozen MLP has streamed its weights through the
        caches; in one loop before the pass they stay cheap. Weights must not change during the pass. ``shape``
        (batch, new tokens), when the hook knows it: a prefix-mean router's sums are set up now too."""
        if not self.fused_inference_ready(self._parameters["residual_scale"].device.type):
            return None
        self.drop_router_losses()
        kernel = self.inference_plan.kernel
        if kernel is not None:
            kernel.prepare(shape, self._modules["experts"].frozen_projections())
        return kernel

    def drop_router_losses(self) -> None:
        """No losses after an inference pass, as the general path leaves them in eval (the fast paths compute none)."""
        router = self._modules["router"]
        if router.aux_loss is not None or router.z_loss is not None:
            router.aux_loss = router.z_loss = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._modules["experts"].computes_mlp:  # mixlora: the frozen projections once, in the bank
            return self.whole_layer_forward(hidden)
        base = self.base_mlp(hidden)
        if not torch.compiler.is_compiling():  # the eager fast paths check on the host (versions, pointers, ctypes);
            fast = self.eager_fast_path(hidden, base)  # compiled, the general path below is what the compiler fuses
            if fast is not None:
                return fast
        return self.general_forward(hidden, base)

    def eager_fast_path(self, hidden: torch.Tensor, base: torch.Tensor) -> Optional[torch.Tensor]:
        """The compiled C kernel or the fused inference plan when they apply, else None (the general path)."""
        kernel = self.pass_kernel
        if kernel is not None and kernel.accepts(hidden, base):
            return kernel(hidden, base)
        if self.use_fused_inference(hidden):
            self.drop_router_losses()
            return self.inference_plan.add_to(base, hidden)
        return None

    def general_forward(self, hidden: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base + alpha_l * MoE(hidden)`` through the router and bank modules: training, and every compiled pass
        (no host synchronisation in eval: a CUDA graph can capture it, tests/modeling/test_adapter.py)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        compute_dtype = self.experts.compute_dtype
        moe = self.experts(flat.to(compute_dtype), *self.bank_routing(hidden))
        return base + (self.residual_scale.to(compute_dtype) * moe).to(base.dtype).reshape(base.shape)

    def whole_layer_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``MLP(hidden) + alpha_l * MoE(hidden)`` from a bank that computes the frozen MLP's projections itself
        (``ExpertBank.computes_mlp``), in every mode: running the MLP here too would compute them twice. In eager
        inference on a CPU its compiled kernel does the routed part, where it takes these tensors."""
        if not torch.compiler.is_compiling():
            kernel = self.pass_kernel
            if kernel is None and self.use_fused_inference(hidden):
                self.drop_router_losses()  # a call outside a model pass (whose hook asks once for every layer)
                kernel = self.inference_plan.kernel
            out = self.experts.kernel_layer_output(kernel, hidden) if kernel is not None else None
            if out is not None:
                return out
        flat = hidden.reshape(-1, hidden.shape[-1])
        compute_dtype = self.experts.compute_dtype
        out = self.experts.layer_output(flat.to(compute_dtype), *self.bank_routing(hidden),
                                        self.residual_scale.to(compute_dtype))
        return out.to(hidden.dtype).reshape(hidden.shape)

    def bank_routing(self, hidden: torch.Tensor):
        """The router's ``(indices, gates)`` for the bank (kept for ``metrics.routing.token_routing`` when asked)."""
        routing = self.router.route_sequences(hidden, self.token_mask)
        if self.router.decisions is not None:  # metrics.routing.token_routing: which expert each token got
            self.router.decisions.append(routing)
        return self.router.bank_routing(routing)
