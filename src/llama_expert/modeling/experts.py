"""The expert banks: all experts of one layer as stacked tensors, evaluated with batched matmuls.

Why dense-over-experts and not gather/scatter (MegaBlocks): at rank 16 an expert costs ``E*r*d``
multiply-adds per token, under 2% of the frozen MLP's ``3*d*I``. Computing every expert's small output
and mixing it with a gate matrix that is zero outside each token's top k is exactly the top-k result,
takes two or three matmuls with no Python loop and no index shuffling, and is faster than dispatch at
these sizes on both CPU and GPU (docs/design.md section 3).

Banks are registered by name (``ExpertConfig.expert_type``) and built with
``from_config(hidden_size, num_experts, config, base_mlp=...)``; ``base_mlp`` is the frozen MLP the adapter
wraps (only ``mixlora`` uses it). ``lora_scaling`` is the fixed LoRA factor ``lora_alpha / lora_r``; the
learnable per-layer factor lives in the adapter (``MoEAdapter.residual_scale``), which starts at the bank's
``initial_residual_scale(config)``. Each bank lists the ``ExpertConfig.expert_init`` values it supports in
``expert_inits`` (docs/design.md section 3).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExpertConfig
from ..errors import ConfigError
from ..options import flag_for
from .per_expert import Transfer, select_rows
from .registry import Registry
from .routing.losses import gate_matrix

EXPERT_BANKS = Registry("expert bank", flag_for(ExpertConfig, "expert_type"))
register_expert_bank = EXPERT_BANKS.register


def lora_scaling(config) -> float:
    """The fixed LoRA factor ``lora_alpha / lora_r`` applied to every bank's output."""
    return config.lora_alpha / config.lora_r


class ExpertBank(nn.Module):
    """What every registered bank shares: the ``expert_init`` values it supports and where alpha_l starts.

    ``expert_init="zero"`` (every bank): the output projections start at zero, so the bank outputs exactly
    zero at step 0 and alpha_l starts at ``residual_scale_init``. A bank that supports other values lists
    them in ``expert_inits`` and says in ``initial_residual_scale`` where alpha_l must start for the
    augmented model to equal the base model exactly at step 0.
    """

    expert_inits = ("zero",)
    registered_name = ""
    expert_init_hint = ""
    per_expert_parameters: tuple = ()  # parameters stacked by expert along dim 0 (what select_experts slices)
    # True: the bank computes the frozen MLP's projections itself, and ``layer_output`` gives ``MLP(h) + alpha_l *
    # MoE(h)`` in one pass, so the adapter does not run the MLP a second time (mixlora)
    computes_mlp = False

    def layer_output(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                     residual_scale: torch.Tensor) -> torch.Tensor:
        """``MLP(h) + alpha_l * MoE(h)`` [N, d], for a bank that ``computes_mlp``."""
        raise NotImplementedError

    def kernel_layer_output(self, kernel, hidden: torch.Tensor):
        """``layer_output`` in inference through the compiled kernel (a ``LayerKernel``, built from ``kernel_form``),
        for a bank that ``computes_mlp``; None where the kernel does not take these tensors."""
        raise NotImplementedError

    def frozen_projections(self):
        """For a bank that ``computes_mlp``: what ``kernel_layer_output`` needs of the frozen MLP, looked up once per
        model pass (``MoEAdapter.kernel_for_pass``); None otherwise."""
        return None

    def select_experts(self, index: torch.Tensor) -> List[Transfer]:
        """New expert j is old expert ``index[j]`` (a subset keeps, a repeat copies); shared tensors stay."""
        transfers = select_rows(self, self.per_expert_parameters, index)
        self.num_experts = int(index.numel())
        return transfers

    @classmethod
    def check_config(cls, config) -> None:
        """Raise ConfigError when this bank cannot be built from ``config`` (called before a model loads)."""
        if config.expert_init not in cls.expert_inits:
            raise ConfigError(f"--expert-type {cls.registered_name} does not support --expert-init "
                              f"{config.expert_init}; it supports {', '.join(cls.expert_inits)}."
                              f"{cls.expert_init_hint}")

    @classmethod
    def initial_residual_scale(cls, config) -> float:
        return float(config.residual_scale_init)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the bank computes in (its parameters'; float32 after augment_model)."""
        return next(self.parameters()).dtype

    # the decode fast path (modeling.fused_inference); a bank without an inference form keeps this default
    def inference_state(self, residual_scale: torch.Tensor):
        """``(input_rows, state)`` derived from the parameters with ``residual_scale`` (alpha_l) folded in:
        ``input_rows`` [m, d] join the router's ``W_g`` in one matmul with ``h`` (None: ``inference_output`` reads
        ``h`` itself), ``state`` is what ``inference_output`` needs. None where this bank has no inference form
        (the adapter then keeps the general path)."""
        return None

    def inference_output(self, rows: torch.Tensor, gates: torch.Tensor, state) -> torch.Tensor:
        """``alpha_l * MoE(h)`` [N, d] from ``input_rows h`` [N, m] (or ``h``) and dense gates [N, E]."""
        raise NotImplementedError

    def kernel_form(self, residual_scale: torch.Tensor):
        """The bank as the compiled decode kernel reads it (modeling/decode_kernel.c): ``(name, rank, width,
        tensors)``, run by the C function ``<name>_delta``; ``tensors`` holds ``input_rows`` (``A`` [r, d]), ``up``
        and, for cores, ``core_in`` / ``core_out``, with ``alpha_l * s`` folded into ``up``. None: the kernel has no
        form of this bank (the PyTorch fused path runs it)."""
        return None


def register_bank(name: str):
    """``register_expert_bank`` that also tells the class its registered name (for error messages)."""
    def add(cls):
        cls.registered_name = name
        return register_expert_bank(name)(cls)
    return add


@register_bank("shared_core")
class SharedCoreExperts(ExpertBank):
    """Experts that share ``A: d->r`` and ``B: r->d``; expert i owns a core ``r->e->r``.

    ``MoE(h) = s * B( z + sum_i g_i * W2_i silu(W1_i z) )``, ``z = A dropout(h)``, ``s = lora_alpha/r``,
    ``e = expert_hidden_size``. The identity path ``z`` makes the bank at least as expressive as one
    rank-r LoRA; the routed cores add token-dependent nonlinear corrections. ``B`` starts at zero, so the
    bank outputs exactly zero at step 0.

    Only ``expert_init="zero"``: the experts' cores are random and distinct already; what makes all
    experts compute the same function (zero) at step 0 is the shared ``B``, and after the first step
    ``B != 0`` maps the distinct cores to distinct outputs (docs/design.md section 3).
    """

    expert_init_hint = " Its experts' cores are random and distinct already; use --expert-init zero."
    per_expert_parameters = ("core_in", "core_out")

    def __init__(self, hidden_size: int, num_experts: int, rank: int, expert_hidden_size: int,
                 lora_scaling: float, dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.lora_scaling = lora_scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.Parameter(torch.empty(rank, hidden_size))  # A
        self.up = nn.Parameter(torch.zeros(hidden_size, rank))  # B, zero: the adapter starts as a no-op
        self.core_in = nn.Parameter(torch.empty(num_experts, rank, expert_hidden_size))  # W1_i
        self.core_out = nn.Parameter(torch.empty(num_experts, expert_hidden_size, rank))  # W2_i
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.normal_(self.core_in, std=rank ** -0.5)
        nn.init.normal_(self.core_out, std=expert_hidden_size ** -0.5)

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config, base_mlp=None) -> "SharedCoreExperts":
        return cls(hidden_size, num_experts, config.lora_r, config.expert_hidden_size or config.lora_r,
                   lora_scaling(config), config.lora_dropout)

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(hidden) if self.training else hidden, self.down)  # [N, r]
        inner = F.silu(torch.matmul(z, self.core_in))  # [E, N, e]: every expert's core, one batched matmul
        weights = gate_matrix(indices, gates, self.num_experts).to(z.dtype)  # [N, E]
        routed = torch.matmul(weights.t().unsqueeze(-1) * inner, self.core_out).sum(0)  # gate, W2_i, sum
        return F.linear(z + routed, self.up) * self.lora_scaling

    def inference_state(self, residual_scale: torch.Tensor):
        """Input rows ``[A; (W1_1 .. W1_E)^T A]`` (``z`` and every core's input from one matmul with ``h``), the
        cores' ``W2`` side by side as [E*e, r], and ``alpha_l * s * B``."""
        if self.down.dtype != torch.float32:
            return None
        experts, rank, width = self.core_in.shape
        down = self.down.detach()
        core_in = self.core_in.detach().transpose(0, 1).reshape(rank, experts * width)  # [r, E*e]
        return torch.cat([down, core_in.t() @ down]), (
            rank, self.core_out.detach().reshape(experts * width, rank).contiguous(),
            self.up.detach() * (self.lora_scaling * residual_scale))

    def inference_output(self, rows: torch.Tensor, gates: torch.Tensor, state) -> torch.Tensor:
        rank, core_out, up = state
        z, n = rows[:, :rank], rows.shape[0]
        inner = F.silu(rows[:, rank:]).view(n, self.num_experts, -1) * gates.unsqueeze(-1)  # g_i silu(W1_i z)
        return F.linear(torch.addmm(z, inner.view(n, -1), core_out), up)  # B (z + sum_i g_i W2_i ...)

    def kernel_form(self, residual_scale: torch.Tensor):
        if self.down.dtype != torch.float32:
            return None
        experts, rank, width = self.core_in.shape
        return "shared_core", rank, width, {"input_rows": self.down, "core_in": self.core_in,
                                            "core_out": self.core_out,
                                            "up": self.up.detach() * (self.lora_scaling * residual_scale)}


@register_bank("shared_down")
class SharedDownExperts(ExpertBank):
    """HydraLoRA-like experts: shared ``A: d->r``, expert i owns ``B_i: r->d``.

    ``MoE(h) = s * sum_i g_i B_i A dropout(h)``, computed as one matmul of the gate-scaled copies of
    ``z`` ([N, E*r]) with the stacked ``B`` ([E*r, d]).

    ``expert_init="zero"``: every ``B_i`` starts at zero. ``"distinct"``: every ``B_i`` starts random,
    ``N(0, 1/r)`` (the scale of a fresh ``r -> d`` layer), so the experts compute different functions from
    the start; the adapter's alpha_l then starts at 0 instead of ``residual_scale_init``, which keeps the
    step-0 output exactly the base model's (docs/design.md section 3).
    """

    expert_inits = ("zero", "distinct")
    per_expert_parameters = ("up",)

    def __init__(self, hidden_size: int, num_experts: int, rank: int, lora_scaling: float, dropout: float = 0.0,
                 distinct: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.lora_scaling = lora_scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.Parameter(torch.empty(rank, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, rank, hidden_size))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        if distinct:
            nn.init.normal_(self.up, std=rank ** -0.5)

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config, base_mlp=None) -> "SharedDownExperts":
        return cls(hidden_size, num_experts, config.lora_r, lora_scaling(config), config.lora_dropout,
                   distinct=config.expert_init == "distinct")

    @classmethod
    def initial_residual_scale(cls, config) -> float:
        """0 with random ``B_i`` ("distinct"): ``0 * MoE(h)`` is exactly zero; else ``residual_scale_init``."""
        return 0.0 if config.expert_init == "distinct" else float(config.residual_scale_init)

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(hidden) if self.training else hidden, self.down)  # [N, r]
        weights = gate_matrix(indices, gates, self.num_experts).to(z.dtype)  # [N, E]
        scaled = (weights.unsqueeze(-1) * z.unsqueeze(1)).reshape(z.shape[0], -1)  # [N, E*r]
        return scaled @ self.up.reshape(-1, self.up.shape[-1]) * self.lora_scaling

    def inference_state(self, residual_scale: torch.Tensor):
        """Input rows ``A``, and the stacked ``B_i`` [E*r, d] times ``alpha_l * s``."""
        if self.down.dtype != torch.float32:
            return None
        stacked_up = self.up.detach().reshape(-1, self.up.shape[-1])
        return self.down.detach(), stacked_up * (self.lora_scaling * residual_scale)

    def inference_output(self, rows: torch.Tensor, gates: torch.Tensor, state) -> torch.Tensor:
        return (gates.unsqueeze(-1) * rows.unsqueeze(1)).reshape(rows.shape[0], -1) @ state  # z = A h

    def kernel_form(self, residual_scale: torch.Tensor):
        if self.down.dtype != torch.float32:
            return None
        return "shared_down", self.down.shape[0], 0, {
            "input_rows": self.down, "up": self.up.detach() * (self.lora_scaling * residual_scale)}


def global_forward_hooks() -> bool:
    """Whether forward hooks registered for every module (``nn.modules.module.register_module_forward_hook`` and its
    pre-hook) are set: a path that skips module calls must not skip them."""
    module = nn.modules.module
    return bool(getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None))


def computes_silu(activation) -> bool:
    """Whether the MLP's activation is SiLU, asked of its values (Transformers' ``SiLUActivation`` is not an
    ``nn.SiLU``, and this package does not import Transformers below ``integration``)."""
    probe = torch.linspace(-8.0, 8.0, 65)
    with torch.no_grad():
        return torch.equal(activation(probe), F.silu(probe))


@register_bank("mixlora")
class MixLoRAExperts(ExpertBank):
    """MixLoRA: expert i is a rank-r LoRA delta on the frozen MLP's own gate, up and down projections.

    With the Llama MLP ``MLP(h) = W2 (act(W1 h) * (W3 h))`` and ``s = lora_alpha / r``, expert i computes
    ``E_i(h) = (W2 + s D2_i C2_i) (act(W1 h + s D1_i C1_i h) * (W3 h + s D3_i C3_i h))`` (``C: A``, down,
    random; ``D: B``, up, zero-initialised), and the bank returns the routed change of the MLP's output

        ``MoE(h) = sum_i g_i (E_i(h) - MLP(h))
                 = W2 (sum_i g_i (m_i - m)) + s sum_i g_i D2_i C2_i m_i``,
        ``m = act(W1 h) * (W3 h)``,  ``m_i = act(W1 h + s D1_i C1_i h) * (W3 h + s D3_i C3_i h)``.

    With gates summing to 1 and alpha_l = 1, ``MLP(h) + MoE(h) = sum_i g_i E_i(h)``: MixLoRA's layer. ``W1 h``
    and ``W3 h`` are computed once per token and shared by the experts, and the adapter takes the whole layer from
    ``layer_output`` (``computes_mlp``) instead of running ``base_mlp(h)`` too: the frozen projections run once,
    ``3dI`` multiply-adds as in the MLP alone. The frozen projections run in the base's dtype (also 4-bit); the LoRA
    paths in the bank's (float32). Every ``D`` starts at zero, so ``m_i == m`` bit for bit and the output
    is exactly zero at step 0. Needs a Llama-style MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``),
    passed as ``base_mlp``; it is referenced, not registered, so its weights stay out of the bank's
    parameters and state dict.
    """

    MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
    expert_init_hint = " Its experts' A matrices (C) are random and distinct already; use --expert-init zero."
    per_expert_parameters = ("gate_down", "gate_up", "up_down", "up_up", "down_down", "down_up")
    computes_mlp = True  # ``layer_output``: the adapter takes the whole layer from here

    def __init__(self, base_mlp: nn.Module, hidden_size: int, num_experts: int, rank: int, lora_scaling: float,
                 dropout: float = 0.0):
        super().__init__()
        missing = [name for name in self.MLP_PARTS if not hasattr(base_mlp, name)]
        if missing:
            raise ConfigError(f"--expert-type mixlora needs a Llama-style MLP with gate_proj, up_proj, down_proj "
                              f"and act_fn; {type(base_mlp).__name__} lacks {', '.join(missing)}. Use shared_core "
                              f"or shared_down.")
        intermediate = base_mlp.gate_proj.out_features
        self._base = (base_mlp,)  # a tuple: not a submodule, so the frozen weights are not the bank's parameters
        self.num_experts, self.rank = num_experts, rank
        self.lora_scaling = lora_scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate_down = nn.Parameter(torch.empty(num_experts, rank, hidden_size))  # C1_i: d -> r
        self.gate_up = nn.Parameter(torch.zeros(num_experts, rank, intermediate))  # D1_i: r -> I, stored [r, I]
        self.up_down = nn.Parameter(torch.empty(num_experts, rank, hidden_size))  # C3_i
        self.up_up = nn.Parameter(torch.zeros(num_experts, rank, intermediate))  # D3_i
        self.down_down = nn.Parameter(torch.empty(num_experts, rank, intermediate))  # C2_i: I -> r
        self.down_up = nn.Parameter(torch.zeros(num_experts, rank, hidden_size))  # D2_i: r -> d, stored [r, d]
        for p in (self.gate_down, self.up_down, self.down_down):  # LoRA's A init: U(+-1/sqrt(fan_in)) per expert
            bound = p.shape[-1] ** -0.5
            nn.init.uniform_(p, -bound, bound)

    @classmethod
    def from_config(cls, hidden_size: int, num_experts: int, config, base_mlp=None) -> "MixLoRAExperts":
        if base_mlp is None:
            raise ConfigError("expert_type 'mixlora' needs the frozen MLP: from_config(..., base_mlp=mlp).")
        return cls(base_mlp, hidden_size, num_experts, config.lora_r, lora_scaling(config), config.lora_dropout)

    def _low_rank(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Every expert's ``C_i x`` at once: [N, E, r]."""
        return F.linear(x, down.reshape(-1, down.shape[-1])).view(x.shape[0], self.num_experts, self.rank)

    def routed(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor):
        """``(m as the frozen MLP computes it, sum_j g_j (m_j - m), s sum_j g_j D2_j C2_j m_j, the frozen layers'
        dtype)``, the last two in ``hidden``'s dtype."""
        mlp = self._base[0]
        n, dtype = hidden.shape[0], hidden.dtype
        weight = mlp.gate_proj.weight
        base_dtype = weight.dtype if weight.is_floating_point() else dtype  # 4-bit layers cast the input
        frozen_in = hidden.to(base_dtype)
        u_frozen, v_frozen = mlp.gate_proj(frozen_in), mlp.up_proj(frozen_in)  # W1 h, W3 h, shared by every expert
        u, v = u_frozen.to(dtype), v_frozen.to(dtype)
        m = mlp.act_fn(u) * v
        m_frozen = m if u_frozen.dtype == dtype else mlp.act_fn(u_frozen) * v_frozen  # bit for bit the MLP's
        x = self.dropout(hidden) if self.training else hidden
        z_gate, z_up = self._low_rank(x, self.gate_down), self._low_rank(x, self.up_down)  # [N, E, r]
        gate_up = self.gate_up.reshape(-1, self.gate_up.shape[-1])  # [E*r, I]
        up_up = self.up_up.reshape(-1, self.up_up.shape[-1])
        change = torch.zeros_like(m)  # sum_j g_j (m_j - m)
        down_in = hidden.new_zeros(n, self.num_experts, self.rank)  # sum_j g_j onehot(i_j) C2 m_j
        for slot in range(indices.shape[1]):  # k slots; dense over experts inside each (one-hot masks)
            pick = F.one_hot(indices[:, slot], self.num_experts).to(dtype).unsqueeze(-1)  # [N, E, 1]
            g = gates[:, slot].to(dtype).unsqueeze(-1)  # [N, 1]
            m_j = (mlp.act_fn(u + (z_gate * pick).reshape(n, -1) @ gate_up * self.lora_scaling)
                   * (v + (z_up * pick).reshape(n, -1) @ up_up * self.lora_scaling))
            change = change + g * (m_j - m)
            m_in = self.dropout(m_j) if self.training else m_j
            down_in = down_in + g.unsqueeze(-1) * pick * self._low_rank(m_in, self.down_down)
        lora_down = down_in.reshape(n, -1) @ self.down_up.reshape(-1, self.down_up.shape[-1]) * self.lora_scaling
        return m_frozen, change, lora_down, base_dtype

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        mlp = self._base[0]
        _, change, lora_down, base_dtype = self.routed(hidden, indices, gates)
        through_w2 = mlp.down_proj(change.to(base_dtype))
        if mlp.down_proj.bias is not None:
            through_w2 = through_w2 - mlp.down_proj.bias
        return through_w2.to(hidden.dtype) + lora_down

    def layer_output(self, hidden: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                     residual_scale: torch.Tensor) -> torch.Tensor:
        """``MLP(h) + alpha_l MoE(h) = W2 (m + alpha_l sum_j g_j (m_j - m)) + alpha_l s sum_j g_j D2_j C2_j m_j``: the
        frozen projections once (``3dI`` multiply-adds, as the MLP alone), not the MLP and then the bank (``6dI``).
        ``m`` as the MLP computes it (in the base's dtype): where the routed change is zero (step 0, a null expert's
        tokens) the output is the base's bit for bit, as the other banks' ``MLP(h) + 0`` is."""
        m, change, lora_down, _ = self.routed(hidden, indices, gates)
        scale = residual_scale.to(change.dtype)
        return self._base[0].down_proj(m + (scale * change).to(m.dtype)).to(change.dtype) + scale * lora_down

    def kernel_form(self, residual_scale: torch.Tensor):
        """``mixlora_layer`` of decode_kernel.c (a ``LayerKernel``): per expert ``[C1_i; C3_i]`` as input rows,
        ``s [D1_i; D3_i]``, ``C2_i`` and ``alpha_l s D2_i``; the kernel computes ``silu``, so another activation
        keeps the general path."""
        if self.gate_down.dtype != torch.float32 or not computes_silu(self._base[0].act_fn):
            return None
        rows = torch.cat([self.gate_down, self.up_down], dim=1)
        return "mixlora", self.rank, self.gate_up.shape[-1], {
            "input_rows": rows.reshape(-1, rows.shape[-1]),
            "core_in": torch.cat([self.gate_up, self.up_up], dim=1) * self.lora_scaling,
            "core_out": self.down_down, "up": self.down_up * (self.lora_scaling * residual_scale)}

    def kernel_layer_output(self, kernel, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """``layer_output`` through the compiled kernel (decode, eval): the frozen projections here, as the MLP runs
        them, the routing and the chosen experts in one C call. None where the kernel does not take these tensors
        (a 4-bit or other-dtype base: the general path runs)."""
        frozen = kernel.frozen or self.frozen_projections()
        if frozen is None or frozen[0][0].dtype is not hidden.dtype or not kernel.accepts_hidden(hidden):
            return None
        (w1, b1), (w3, b3), (w2, b2) = frozen
        u, v = F.linear(hidden, w1, b1), F.linear(hidden, w3, b3)  # as the MLP's nn.Linear layers compute them
        m = F.silu(u) * v  # (kernel_form checked that the MLP's activation is SiLU)
        beside = kernel(hidden, u, v, m)  # m becomes W2's input
        down = F.linear(m, w2, b2)
        return down.add_(beside) if down.dtype is torch.float32 else down.float().add_(beside).to(hidden.dtype)

    def frozen_projections(self):
        """The ``(weight, bias)`` of the MLP's gate, up and down projections when calling each would be exactly
        ``F.linear`` on CPU weights, for the kernel path (a module call per projection costs more than the adapter's
        C call at batch 1); None otherwise, and the general path calls them: a 4-bit or wrapped layer, a forward hook
        (the module's or a global one), a ``forward`` replaced on the instance (Accelerate's offloading hooks) or
        weights elsewhere (``meta`` when offloaded)."""
        if global_forward_hooks():
            return None
        parts = self._base[0]._modules  # (the dicts directly: this runs once per layer per decode step)
        frozen = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = parts.get(name)
            if (type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks
                    or "forward" in layer.__dict__ or not layer._parameters["weight"].is_cpu):
                return None
            frozen.append((layer._parameters["weight"], layer._parameters["bias"]))
        return frozen
