"""ExpertConfig: every knob of the MoE adapters, validated once, stored as JSON beside the adapter.

Validation happens at construction so that a config that cannot work (top_k > num_experts, a rank of 0,
an unknown allocation) fails before a model is loaded, with a message that names the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from .errors import ConfigError
from .options import flag_for, option


def parse_allocation(text: str) -> Union[str, List[int]]:
    """``--expert-allocation``: a registered rule name, or counts like ``4,6,8,6``."""
    if not any(ch.isdigit() for ch in text):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--expert-allocation {text!r}: use progressive, uniform or counts like 4,6,8,6") from None



@dataclass
class ExpertConfig:
    """Configuration of the MoE adapters.

    expert_type:
        ``shared_core`` (default): per layer one shared down-projection ``A: d->r`` and one shared
        up-projection ``B: r->d`` (zero-initialised); each expert owns a small nonlinear core in the
        r-dimensional space. Fits the 0.2% budget on Llama 3.2 1B.
        ``shared_down`` (HydraLoRA-like): shared ``A``, each expert owns its own ``B_i: r->d``.
        ``mixlora``: each expert is a rank-r LoRA delta on the frozen MLP's gate, up and down projections
        (MixLoRA); far above the 0.2% budget at the defaults (docs/design.md section 3).
        ``lora_experts``: each expert owns its ``A_i: d->expert_rank`` and ``B_i`` (fewer, larger experts that
        differ in their own subspaces), plus an optional always-on shared expert of ``shared_expert_rank``.
    null_expert:
        one more routing choice (the last logit of every router) whose output is zero; it takes no part in
        load balancing (docs/design.md section 2).
    balance_window:
        0 (default): the balancing statistics are those of each micro-batch (summed over data-parallel ranks);
        ``W > 0``: an exponential moving average over about the last ``W`` sequences.
    expert_init:
        ``zero`` (every bank): the output projections start at zero. ``distinct`` (``shared_down`` only):
        every ``B_i`` starts random and ``residual_scale`` starts at 0 instead of ``residual_scale_init``.
        Each bank says which values it supports; ``modeling.check_config`` rejects the others.
    expert_allocation:
        ``progressive`` (few experts in the first and last layers, most in the middle), ``uniform``
        (``num_experts`` everywhere) or an explicit list with one count per decoder layer.

    Two factors scale the experts' output, and they are named apart: the fixed LoRA factor
    ``lora_alpha / lora_r`` inside each bank, and the learnable per-layer ``residual_scale`` (alpha_l in
    docs/design.md section 3) of each adapter, which starts at ``residual_scale_init``.

    Names of strategies (``expert_type``, ``router_type``, ``expert_allocation``) are checked against
    their registries by ``llama_expert.modeling.check_config``; this class checks types and ranges.
    """

    num_experts: int = option(8, "most experts in a layer (the progressive allocation peaks here)")
    top_k: int = option(2, "experts each token is routed to")
    expert_hidden_size: Optional[int] = option(None, "width of each shared_core expert's core (default: --lora-r)")
    lora_r: int = option(16, "rank of the experts (with --method lora: the LoRA rank)")
    lora_alpha: float = option(32.0, "LoRA alpha: the experts' output is scaled by lora_alpha / lora_r")
    lora_dropout: float = option(0.05, "dropout on the experts' input while training")
    router_aux_loss_coef: float = option(0.01, "weight of the load-balancing loss")
    router_z_loss_coef: float = option(0.001, "weight of the router z-loss")
    router_noise: bool = option(True, "switch off the noise of noisy top-k routing in training (Shazeer et al. 2017)")
    expert_allocation: Union[str, List[int]] = option(
        "progressive", "a registered rule (dynamic: start small, grow where routing asks, within --dynamic-budget), "
                       "or a comma-separated expert count per layer", parse=parse_allocation, metavar="COUNTS")
    dynamic_interval: int = option(50, "dynamic allocation: steps between two allocation changes")
    dynamic_budget: Optional[int] = option(None, "dynamic allocation: total experts over all layers (default: what "
                                                 "the progressive allocation gives)")
    dynamic_retire_share: float = option(0.1, "dynamic allocation: retire an expert whose load is below this "
                                              "share of a uniform load (1/E)")
    expert_type: str = option("shared_core", "the expert bank (docs/design.md section 3)")
    router_type: str = option("aux_free", "the router (docs/design.md section 2; aux_free: the best of the "
                                           "multi-domain study, docs/results/README.md)")
    router_jitter: float = option(0.01, "switch router: multiplicative jitter eps on the router input in training "
                                        "(uniform in [1-eps, 1+eps]; 0 turns it off)")
    capacity_factor: Optional[float] = option(None, "switch: expert capacity ceil(factor * tokens / experts) in training, "
                                                    "overflow tokens skip the experts (default: none); expert_choice: "
                                                    "each expert takes ceil(factor * tokens * top_k / experts) "
                                                    "tokens (default 1)")
    aux_free_bias_rate: float = option(1e-3, "aux_free router: step gamma of the balancing bias update "
                                             "b_i += gamma * sign(mean load - load_i)")
    oracle_domains: int = option(2, "oracle router: the number of domain labels D (one per --dataset source); domain "
                                    "d's tokens use experts d*E//D .. (d+1)*E//D - 1 of each layer's E")
    prototype_temperature: float = option(1.0, "prototype router (a mix's): logit -d_i / T, d_i the mean squared "
                                               "difference of the sequence's prefix mean and expert i's prototype")
    residual_scale_init: float = option(1.0, "initial value of the learnable per-layer scale alpha_l")
    expert_init: str = option("zero", "how the experts start: zero (output projections zero) or distinct (shared_down: "
                                       "random B_i, alpha_l starts at 0); both give exactly the base model at step 0")
    router_lr_multiplier: float = option(1.0, "the routers train at this multiple of --learning-rate")
    router_init_scale: float = option(0.1, "router matrix W_g starts normal with std router_init_scale / sqrt(hidden) "
                                           "(0: all logits equal at step 0)")
    expert_rank: Optional[int] = option(None, "lora_experts: rank of each routed expert's own A_i and B_i "
                                              "(default: max(1, lora_r // num_experts))")
    shared_expert_rank: int = option(0, "lora_experts: rank of an always-on shared expert B_s A_s (0: none)")
    null_expert: bool = option(False, "give every router one more choice, the null expert, whose output is zero: "
                                      "text the adapter was not trained for can keep the base model's behaviour")
    balance_window: int = option(0, "load balancing (the load-balancing loss's f_i, aux_free's load) over a moving "
                                    "average of about this many sequences, summed over data-parallel ranks "
                                    "(0: each micro-batch alone)")
    router_mi_loss_coef: float = option(0.0, "weight of the mutual-information loss "
                                             "-(H(mean routing) - mean H(routing)) over a batch's tokens (0: off)")
    use_gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)",
                                              flag="--gradient-checkpointing")
    quantization_4bit: bool = option(False, "load the base in 4 bit (bitsandbytes NF4 on CUDA, optimum-quanto "
                                                      "int4 weights on a CPU)")

    def __post_init__(self):
        if isinstance(self.expert_allocation, tuple):
            self.expert_allocation = list(self.expert_allocation)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        shown = reprlib.repr  # a value from an edited adapter file may be a list of 10^6 entries: one short line

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        def flag(name: str) -> str:  # messages name the flag a user types (also shown for a config file)
            return flag_for(ExpertConfig, name)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(integer(self.num_experts) and self.num_experts >= 1,
             f"{flag('num_experts')} must be a positive integer, got {shown(self.num_experts)}.")
        need(integer(self.top_k) and self.top_k >= 1,
             f"{flag('top_k')} must be a positive integer, got {shown(self.top_k)}.")
        need(self.top_k <= self.num_experts,
             f"--top-k {self.top_k} > --num-experts {self.num_experts}: a token cannot pick more experts "
             f"than exist. Lower --top-k or raise --num-experts.")
        need(integer(self.lora_r) and self.lora_r >= 1,
             f"{flag('lora_r')} must be a positive integer (the rank of the experts), got {shown(self.lora_r)}.")
        need(self.expert_hidden_size is None or (integer(self.expert_hidden_size) and self.expert_hidden_size >= 1),
             f"{flag('expert_hidden_size')} must be a positive integer or None, got {shown(self.expert_hidden_size)}.")
        need(finite(self.lora_alpha) and self.lora_alpha > 0,
             f"{flag('lora_alpha')} must be a finite number > 0, got {shown(self.lora_alpha)}.")
        need(finite(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
             f"{flag('lora_dropout')} must be in [0, 1), got {shown(self.lora_dropout)}.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_mi_loss_coef"):
            need(finite(getattr(self, name)) and getattr(self, name) >= 0,
                 f"{flag(name)} must be a finite number >= 0, got {shown(getattr(self, name))}.")
        need(finite(self.router_jitter) and 0.0 <= self.router_jitter < 1.0,
             f"{flag('router_jitter')} must be in [0, 1), got {shown(self.router_jitter)}.")
        need(self.capacity_factor is None or (finite(self.capacity_factor) and self.capacity_factor > 0),
             f"{flag('capacity_factor')} must be None or a finite number > 0, got {shown(self.capacity_factor)}.")
        need(finite(self.aux_free_bias_rate) and self.aux_free_bias_rate >= 0,
             f"{flag('aux_free_bias_rate')} must be a finite number >= 0, got {shown(self.aux_free_bias_rate)}.")
        need(integer(self.oracle_domains) and self.oracle_domains >= 1,
             f"{flag('oracle_domains')} must be a positive integer, got {shown(self.oracle_domains)}.")
        need(finite(self.prototype_temperature) and self.prototype_temperature > 0,
             f"{flag('prototype_temperature')} must be a finite number > 0, got {shown(self.prototype_temperature)}.")
        need(finite(self.residual_scale_init), f"{flag('residual_scale_init')} must be a finite number, got "
                                               f"{shown(self.residual_scale_init)}.")
        need(isinstance(self.expert_init, str) and self.expert_init != "",  # the bank checks the value
             f"{flag('expert_init')} must be a name such as 'zero' or 'distinct', got {shown(self.expert_init)}.")
        need(finite(self.router_init_scale) and self.router_init_scale >= 0,
             f"{flag('router_init_scale')} must be a finite number >= 0, got {shown(self.router_init_scale)}.")
        need(finite(self.router_lr_multiplier) and self.router_lr_multiplier > 0,
             f"{flag('router_lr_multiplier')} must be a finite number > 0, got {shown(self.router_lr_multiplier)}.")
        need(self.expert_rank is None or (integer(self.expert_rank) and self.expert_rank >= 1),
             f"{flag('expert_rank')} must be a positive integer or None, got {shown(self.expert_rank)}.")
        need(integer(self.shared_expert_rank) and self.shared_expert_rank >= 0,
             f"{flag('shared_expert_rank')} must be an integer >= 0 (0: no shared expert), got "
             f"{shown(self.shared_expert_rank)}.")
        need(integer(self.balance_window) and self.balance_window >= 0,
             f"{flag('balance_window')} must be an integer >= 0 (sequences; 0: each micro-batch alone), got "
             f"{shown(self.balance_window)}.")
        for name in ("router_noise", "use_gradient_checkpointing", "quantization_4bit", "null_expert"):
            need(isinstance(getattr(self, name), bool),
                 f"{flag(name)} must be True or False, got {shown(getattr(self, name))}.")
        for name in ("expert_type", "router_type"):
            need(isinstance(getattr(self, name), str) and getattr(self, name) != "",
                 f"{flag(name)} must be the name of a registered strategy, got {shown(getattr(self, name))}.")
        need(integer(self.dynamic_interval) and self.dynamic_interval >= 1,
             f"{flag('dynamic_interval')} must be an integer >= 1, got {shown(self.dynamic_interval)}.")
        need(self.dynamic_budget is None or (integer(self.dynamic_budget) and self.dynamic_budget >= 1),
             f"{flag('dynamic_budget')} must be None or an integer >= 1, got {shown(self.dynamic_budget)}.")
        need(finite(self.dynamic_retire_share) and 0 <= self.dynamic_retire_share < 1,
             f"{flag('dynamic_retire_share')} must be in [0, 1), got {shown(self.dynamic_retire_share)}.")
        alloc = self.expert_allocation
        if not isinstance(alloc, str):
            need(isinstance(alloc, list) and len(alloc) > 0 and all(integer(n) for n in alloc),
                 f"{flag('expert_allocation')} must be 'progressive', 'uniform' or a list of integers, got "
                 f"{shown(alloc)}.")
            bad = [n for n in alloc if not self.top_k <= n <= self.num_experts]
            need(not bad, f"--expert-allocation {shown(alloc)} has counts {shown(bad)} outside [--top-k {self.top_k}, "
                          f"--num-experts {self.num_experts}]; every layer needs at least --top-k experts.")

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ExpertConfig fields {reprlib.repr(unknown)}; this adapter may come from a "
                              f"newer llama-expert. Upgrade the package.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_json_file(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json_string() + "\n")

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "ExpertConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
