"""``mix``: adapters trained apart, one skill each, become the experts of one adapter that routes each text to its
skill by the nearest prototype (docs/design.md section 2, ``prototype``; Branch-Train-MiX, Sukhbaatar et al. 2024,
grows domain experts apart and then mixes them). Mixing needs no data: each branch recorded its prototypes.

A branch is an MoE adapter of the ``lora_experts`` bank with one expert per layer (``train --expert-type
lora_experts --num-experts 1``, a shared expert allowed): its layer adds ``alpha_l * s * (B_s A_s + B_1 A_1) x``, one
LoRA of rank ``r_s + r_e`` beside the MLP. The mix is a ``lora_experts`` adapter with one expert per branch, of the
largest branch rank (a smaller one padded with zero rows, which add nothing), each branch's ``alpha_l * s`` folded
into its ``B``; the mix's own ``alpha_l`` and ``s = lora_alpha / lora_r`` are 1. So a sequence routed to expert i
(top-1, gate 1) computes branch i's layer exactly, up to float rounding. The result is an ordinary adapter: it
loads in ``inference``, ``benchmark``, ``compare`` and ``serve``, and ``prune`` can drop a skill.

A mixed adapter given to ``mix`` brings each of its experts as it is (rows, prototype, spread): mixing it with a new
branch adds a skill and leaves the experts already there untouched.

The null expert's threshold at prefix length n is ``D`` (``--null-distance``) times the largest branch spread of
the layer at that length, ``spread + spread_slope / n`` (``integration.prototypes``): it tightens as the prefix
grows, as the prefix means of a branch's own kind of text draw nearer to its prototype.

PEFT LoRA folders on the MLP projections (what ``train --method lora`` writes, with its prototypes) mix alike, into
the ``mixlora`` bank: expert i is LoRA i inside the frozen MLP's ``gate_proj``, ``up_proj`` and ``down_proj``, its
``alpha / r`` folded into its ``B``, so a sequence routed to expert i computes LoRA i's model exactly. A mix holds
experts of one kind: LoRAs beside the MLP (branches) or inside it (PEFT LoRAs), not both.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..config import ExpertConfig
from ..errors import ConfigError
from ..integration.adapter_files import (MIX_REPORT, expert_names, load_adapter_weights, read_adapter_config,
                                         read_config_json, recorded_base, save_adapter, saved_expert_config)
from ..integration.base_models import load_base_model, load_tokenizer
from ..integration.peft_lora import holds_lora, load_lora_model, mlp_lora_layers
from ..integration.prototypes import Prototypes, load_prototypes, measure_prototypes
from ..integration.surgery import adapters, augment_model, decoder_layers, remove_adapters
from ..modeling import experts_per_layer
from ..options import option
from .arguments import AdapterCommandArguments
from .calibration import calibration_windows
from .output import check_output, locked_output, write_outputs

NULL_DISTANCE = 1.5  # chosen on validation text: docs/results/experts-by-design-cheap/null-distance-validation.md
BRANCH_HINT = ("train each branch with --expert-type lora_experts --num-experts 1 --top-k 1 (a --shared-expert-rank "
               "is fine), or as a LoRA with --method lora")


@dataclass
class MixArguments(AdapterCommandArguments):
    adapters: List[str] = option(None, "the adapters to mix, one skill each: branches (`train --expert-type "
                                       "lora_experts --num-experts 1`), PEFT LoRAs (`train --method lora`) or mixes",
                                 default_factory=list)
    output_dir: Optional[str] = option(None, "folder for the mixed adapter")
    top_k: int = option(1, "branches each token uses (1: each sequence's nearest branch alone, as it computes)")
    temperature: float = option(1.0, "prototype router temperature T: the logit of branch i is -d_i / T")
    null_expert: bool = option(False, "add a null expert (the base model's own behaviour) for text unlike every "
                                      "branch's training text")
    null_distance: Optional[float] = option(None, f"with --null-expert: the null wins where every prototype is "
                                                  f"farther than this many times the largest branch spread of the "
                                                  f"layer at the prefix's length (default {NULL_DISTANCE})")
    prototype_data: Optional[str] = option(None, "text to measure the prototypes of adapters that record none (a LoRA "
                                                 "trained elsewhere) on: one source per adapter, comma-separated, in "
                                                 "their order; '-' keeps an adapter's own")
    prototype_tokens: int = option(8192, "with --prototype-data: the tokens of each source measured (its first ones, "
                                         "from its training split, in windows of 256)")

    def validate(self) -> None:
        if len(self.adapters) < 2 - int(self.null_expert):  # one skill beside the base's own behaviour is a mix too
            raise ConfigError(f"mix needs at least two branch adapters, or one with --null-expert, got "
                              f"{len(self.adapters)}: llama-expert mix A B [C ...] --output-dir M.")
        if not self.output_dir:
            raise ConfigError("mix needs --output-dir DIR: where to write the mixed adapter.")
        if len(set(self.adapters)) != len(self.adapters):
            raise ConfigError("mix got the same adapter twice; give each branch once.")
        checks = [(self.top_k >= 1, f"--top-k must be >= 1, got {self.top_k}."),
                  (math.isfinite(self.temperature) and self.temperature > 0,
                   f"--temperature must be a finite number > 0, got {self.temperature}."),
                  (self.null_distance is None or (math.isfinite(self.null_distance) and self.null_distance > 0),
                   f"--null-distance must be a finite number > 0, got {self.null_distance}.")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        sources = self.prototype_sources()
        if len(sources) != len(self.adapters):
            raise ConfigError(f"--prototype-data names {len(sources)} sources for {len(self.adapters)} adapters: give "
                              f"one per adapter, in their order ('-' for one that records its own prototypes).")
        if self.prototype_tokens < 1:
            raise ConfigError(f"--prototype-tokens must be >= 1, got {self.prototype_tokens}.")

    def distance(self) -> float:
        """D: the one given, or the default (chosen on validation for the threshold by length)."""
        return NULL_DISTANCE if self.null_distance is None else self.null_distance

    def prototype_sources(self) -> List[Optional[str]]:
        """Per adapter, the text to measure its prototypes on, or None: its own."""
        if not self.prototype_data:
            return [None] * len(self.adapters)
        return [None if part.strip() == "-" else part.strip() for part in self.prototype_data.split(",")]

    def inputs(self, base: Optional[str]):
        return {"a branch adapter": list(self.adapters), "the base model": [base] if base else [],
                "a --prototype-data source": [s for s in self.prototype_sources() if s]}


# Where each kind of expert goes in the mix: the bank, and per LoRA its parameters' prefix there (``<prefix>down`` holds
# A's rows, ``<prefix>up`` B's); a branch's one LoRA sits beside the MLP, a PEFT LoRA's inside each projection.
BESIDE, INSIDE = "lora_experts", "mixlora"
PROTOTYPE_WINDOW = 256  # tokens per window of --prototype-data text (a branch's are its training blocks)
PREFIXES = {BESIDE: {"": ""}, INSIDE: {"gate_proj": "gate_", "up_proj": "up_", "down_proj": "down_"}}


@dataclass
class Branch:
    """One expert of a mix, as ``read_experts`` reads it from a branch, a PEFT LoRA or a mixed adapter."""

    parts: List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]  # per layer, bank prefix -> (A rows, B rows x scales)
    prototype: torch.Tensor  # [L, d]
    spread: torch.Tensor  # [L]: its prefix means of length n lie about ``spread + spread_slope / n`` from the prototype
    spread_slope: torch.Tensor  # [L]
    name: str = ""  # the branch's folder name (a mixed adapter's experts keep the names its mix recorded)
    bank: str = BESIDE  # the mix's bank that holds this kind of expert
    by_length: bool = True  # False: recorded before the spread by length (format 3), the same spread at every length

    @property
    def rank(self) -> int:
        return max(down.shape[0] for layer in self.parts for down, _ in layer.values())


def is_mixed(config: ExpertConfig) -> bool:
    """An adapter that ``mix`` wrote: its experts join a new mix as they are (adding a skill)."""
    return config.router_type == "prototype" and (
        config.expert_type == INSIDE or (config.expert_type == BESIDE and not config.shared_expert_rank))


def check_branch(config: ExpertConfig, layers: int, folder) -> None:
    """A branch is one LoRA per layer: lora_experts, one expert everywhere, no null expert."""
    counts = set(experts_per_layer(config, layers))
    if config.expert_type != "lora_experts" or counts != {1} or config.null_expert:
        shape = (f"--expert-type {config.expert_type} with {sorted(counts)} experts per layer"
                 + (" and a null expert" if config.null_expert else ""))
        raise ConfigError(f"{folder} is not a branch ({shape}): a mix takes adapters of one LoRA expert per layer, "
                          f"and mixed adapters; {BRANCH_HINT}.")


def own_or_measured(model, folder, windows: Optional[torch.Tensor]) -> Prototypes:
    """The prototypes of the adapter now on ``model``: measured on ``windows`` (``--prototype-data``) when given,
    else the ones its folder records."""
    if windows is not None:
        return measure_prototypes(model, windows)
    return load_prototypes(folder, len(decoder_layers(model)), model.config.hidden_size)


@torch.no_grad()
def read_experts(model, folder, windows: Optional[torch.Tensor] = None) -> List[Branch]:
    """The experts in ``folder`` as per-layer LoRA rows: a branch's one, a PEFT LoRA's, or each expert of a mixed
    adapter; ``windows``: token blocks to measure a branch's or LoRA's prototypes on instead of its recorded ones.
    The adapter is loaded onto ``model`` (its base) and taken off again, so it gets every check an adapter gets
    (base architecture, shapes, finite values)."""
    layers = len(decoder_layers(model))
    if holds_lora(folder):
        return [peft_lora_expert(model, folder, windows)]
    meta = read_adapter_config(folder)
    config = saved_expert_config(meta, folder)
    mixed = is_mixed(config)
    if not mixed:
        check_branch(config, layers, folder)
    elif len(set(experts_per_layer(config, layers))) != 1:
        raise ConfigError(f"{folder} is a mixed adapter whose layers hold different numbers of experts (pruned layer "
                          f"by layer): its skills are no longer whole; mix its branches again instead.")
    elif windows is not None:
        raise ConfigError(f"{folder} is a mixed adapter: its experts bring their own prototypes; give '-' for it in "
                          f"--prototype-data.")
    load_adapter_weights(model, folder)
    prototypes = None if mixed else own_or_measured(model, folder, windows)
    layer_adapters = [adapter for _, adapter in adapters(model)]
    count, label = layer_adapters[0].num_experts, Path(folder).resolve().name
    names = (expert_names(folder, count) or [f"{label} expert {e}" for e in range(count)]) if mixed else [label]
    by_length = meta.get("format_version", 1) >= 4 if mixed else prototypes.fitted  # spread by length
    experts = []
    for e in range(count):
        parts = [expert_rows(adapter, e, folder) for adapter in layer_adapters]
        if mixed:
            prototype, spread, slope = (torch.stack([getattr(a.router, name)[e].detach().float().clone()
                                                     for a in layer_adapters])
                                        for name in ("weight", "spread", "spread_slope"))
        else:
            prototype, (spread, slope) = prototypes.prototype, prototypes.by_length()
        experts.append(Branch(parts, prototype, spread, slope, names[e], config.expert_type, by_length))
    remove_adapters(model)
    return experts


def peft_lora_expert(model, folder, windows: Optional[torch.Tensor] = None) -> Branch:
    """A PEFT LoRA folder as one expert inside the MLP: its LoRAs per projection, its prototypes (``train --method
    lora`` records them; or measured on ``windows`` with the LoRA on, then taken off), and their shapes checked
    against ``model``."""
    layers = len(decoder_layers(model))
    if windows is None:
        prototypes = own_or_measured(model, folder, None)
    else:
        lora = load_lora_model(model, folder)  # PEFT puts the LoRA into ``model``'s own modules ...
        try:
            prototypes = own_or_measured(lora, folder, windows)
        finally:
            lora.unload()  # ... and takes it out again
    parts = []
    for layer, loras in zip(decoder_layers(model), mlp_lora_layers(folder, layers)):
        for target, (down, up) in loras.items():
            projection = getattr(layer.mlp, target)
            if down.shape[1] != projection.in_features or up.shape[1] != projection.out_features:
                raise ConfigError(f"{folder}'s {target} LoRA maps {down.shape[1]} -> {up.shape[1]} features, this "
                                  f"base's {target} {projection.in_features} -> {projection.out_features}: it "
                                  f"belongs to another base. Mix LoRAs of one base.")
        parts.append({PREFIXES[INSIDE][target]: rows for target, rows in loras.items()})
    return Branch(parts, prototypes.prototype, *prototypes.by_length(), Path(folder).resolve().name, INSIDE,
                  prototypes.fitted)


def expert_rows(adapter, expert: int, folder) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Each LoRA of ``expert`` as ``(A rows, B rows times the scales)``: a lora_experts layer's one (its shared
    expert's rows first, ``alpha_l * s`` folded in), or a mixed mixlora layer's three (``s`` folded in; its ``alpha_l``
    is 1 unless trained, and then it scales the whole MLP's change, which no ``B`` can hold)."""
    bank = adapter.experts
    factor = bank.lora_scaling * (adapter.residual_scale.detach().float() if bank.registered_name == BESIDE else 1.0)
    if bank.registered_name == INSIDE and float(adapter.residual_scale) != 1.0:
        raise ConfigError(f"{folder}'s residual scale was trained ({float(adapter.residual_scale):.4g}, not 1): its "
                          f"experts cannot be taken apart; mix its LoRAs again instead.")
    rows = {}
    for prefix in PREFIXES[bank.registered_name].values():
        down = getattr(bank, prefix + "down")[expert].detach().float()
        up = getattr(bank, prefix + "up")[expert].detach().float()
        if bank.registered_name == BESIDE and bank.shared_down is not None:
            down = torch.cat([bank.shared_down.detach().float(), down])
            up = torch.cat([bank.shared_up.detach().float(), up])
        rows[prefix] = (down.clone(), (up * factor).clone())
    return rows


def one_kind(branches: List[Branch]) -> str:
    """The bank of the mix: every expert's own (beside the MLP or inside it), or a one-line refusal."""
    kinds = {b.bank for b in branches}
    if len(kinds) > 1:
        beside = next(b.name for b in branches if b.bank == BESIDE)
        inside = next(b.name for b in branches if b.bank == INSIDE)
        raise ConfigError(f"{beside} is a LoRA beside the MLP (a branch) and {inside} a LoRA inside it (PEFT): a mix "
                          f"holds experts of one kind; mix each kind apart.")
    return kinds.pop()


def mix_config(branches: List[Branch], args: MixArguments) -> ExpertConfig:
    rank = max(b.rank for b in branches)
    return ExpertConfig(expert_type=one_kind(branches), router_type="prototype", num_experts=len(branches),
                        top_k=args.top_k, expert_allocation="uniform", expert_rank=rank, shared_expert_rank=0,
                        lora_r=rank, lora_alpha=float(rank), lora_dropout=0.0, null_expert=args.null_expert,
                        prototype_temperature=args.temperature, residual_scale_init=1.0)


@torch.no_grad()
def mix_branches(model, branches: List[Branch], args: MixArguments):
    """Put mixed adapters on ``model`` (a bare base): expert i of each layer is branch i, routed by its prototype."""
    augment_model(model, mix_config(branches, args))
    distance = args.distance()
    for layer, (_, adapter) in enumerate(adapters(model)):
        bank, router = adapter.experts, adapter.router
        for prefix in PREFIXES[bank.registered_name].values():
            getattr(bank, prefix + "down").zero_()
            getattr(bank, prefix + "up").zero_()
        for i, branch in enumerate(branches):
            for prefix, (down, up) in branch.parts[layer].items():  # a projection a LoRA leaves alone stays zero
                getattr(bank, prefix + "down")[i, :down.shape[0]] = down
                getattr(bank, prefix + "up")[i, :up.shape[0]] = up
            router.weight[i] = branch.prototype[layer]
            router.spread[i] = branch.spread[layer]
            router.spread_slope[i] = branch.spread_slope[layer]
        if router.null_distance is not None:  # D times (the largest spread + the largest slope / n): the largest
            # spread at every length or more (exactly it for one branch)
            router.null_distance.fill_(distance * float(router.spread.max()))
            router.null_slope.fill_(distance * float(router.spread_slope.max()))
        adapter.residual_scale.fill_(1.0)
    return model


def check_spreads(branches: List[Branch], args: MixArguments) -> None:
    """A null expert over branches whose spread is the same at every length (recorded before format 4): the default
    D was chosen for the threshold by length and would send much of their own text to the null, so it is refused;
    a D given is taken, with a warning."""
    old = next((b.name for b in branches if not b.by_length), None)
    if not args.null_expert or old is None:
        return
    message = (f"{old}'s prototypes predate the spread by prefix length (llama-expert format 4): its null threshold "
               f"is the same at every length")
    if args.null_distance is None:
        raise ConfigError(f"{message}, for which the default --null-distance {NULL_DISTANCE} is too tight; measure "
                          f"them again with --prototype-data on its training text, or give --null-distance (4 was "
                          f"that threshold's default).")
    warnings.warn(f"{message}; --prototype-data on its training text measures the spread by length.")


def check_one_base(folders: List[str]) -> None:
    """Every adapter was trained on one base (the same weights, not only the same shapes): a prototype describes
    what one base's layers see."""
    configs = {folder: read_config_json(folder) for folder in folders}
    known = {folder: config["base_model_weights_checksum"] for folder, config in configs.items()
             if config.get("base_model_weights_checksum")}
    if len(set(known.values())) > 1:
        first, *others = known
        other = next(f for f in others if known[f] != known[first])
        raise ConfigError(f"{first} and {other} were trained on different base models (their weights differ): a mix "
                          f"takes adapters of one base; retrain the branch on the others' base.")
    names = {folder: config.get("base_model_name_or_path") for folder, config in configs.items()
             if folder not in known}  # a PEFT LoRA records only its base's name
    if len(set(names.values())) > 1:
        warnings.warn(f"these adapters name different bases ({', '.join(f'{f}: {n}' for f, n in names.items())}) and "
                      f"record no weights checksum to tell whether they are one: a mix of adapters of different bases "
                      f"computes nonsense; mix them only if the names are one model.")


def prototype_windows(args: MixArguments, base: str) -> List[Optional[torch.Tensor]]:
    """Per adapter, the token windows of its ``--prototype-data`` source, or None (its own prototypes)."""
    sources = args.prototype_sources()
    tokenizer = load_tokenizer(base, auth_token=args.auth_token) if any(sources) else None
    return [None if source is None else calibration_windows(tokenizer, source, PROTOTYPE_WINDOW, args.prototype_tokens,
                                                            progress=False) for source in sources]


def run_mix(args: MixArguments) -> Path:
    """The ``mix`` command: read every branch, mix them, write the mixed adapter and ``mix_report.json`` (which names
    each expert after its branch's folder)."""
    args.validate()
    output = Path(args.output_dir)
    base = args.model or recorded_base(args.adapters[0])
    if not base:
        raise ConfigError(f"{args.adapters[0]} records no base model; pass it with --model.")
    check_one_base(args.adapters)
    check_output(output, "mix", args.overwrite, args.inputs(base))
    with locked_output(output, "mix"):
        model = load_base_model(base, auth_token=args.auth_token)
        branches = [expert for folder, windows in zip(args.adapters, prototype_windows(args, base))
                    for expert in read_experts(model, folder, windows)]
        check_spreads(branches, args)
        if args.top_k > len(branches):
            raise ConfigError(f"--top-k {args.top_k} is more than the {len(branches)} experts these adapters bring; "
                              f"give at most {len(branches)}.")
        mix_branches(model, branches, args)
        report = {"adapters": [str(a) for a in args.adapters], "base": base, "top_k": args.top_k,
                  "temperature": args.temperature, "null_expert": args.null_expert,
                  "null_distance": args.distance() if args.null_expert else None,
                  "ranks": [b.rank for b in branches],
                  "experts": [b.name for b in branches],  # what `serve`'s routing page calls each expert
                  "prototype_data": args.prototype_sources() if args.prototype_data else None}
        write_outputs(output, MIX_REPORT, report, lambda staging: save_adapter(model, staging, base))
    null = ", then the null expert" if args.null_expert else ""
    print(f"mixed {len(args.adapters)} adapter(s) into {output}: {len(branches)} expert(s) a layer, in the order "
          f"given{null}")
    return output
