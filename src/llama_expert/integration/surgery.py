"""Inject MoE adapters into a stock Transformers model, freeze the base, count, and take them out again.

Works on any causal LM whose decoder layers carry an ``mlp`` attribute (Llama, Mistral, Qwen2,
SmolLM2, ...). Nothing in Transformers is patched: ``layer.mlp`` is swapped for an ``MoEAdapter`` that
holds the original MLP, and a forward pre-hook hands the attention mask to the routers (and, for sequence
routers, their prefix state: ``integration.prefix_cache``; ``domain_labels`` gives them the domain labels).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import ExpertConfig
from ..errors import ConfigError
from ..modeling import MoEAdapter, TokenMask, check_config, experts_per_layer
from ..modeling.routing.losses import ROUTER_LOSSES
from .prefix_cache import PrefixCarrier

_STATE = "_llama_expert_state"  # attribute on the model: hook handle, mask, requires_grad flags


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: the longest ModuleList whose blocks all have an ``mlp``."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(b, "mlp") for b in module):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of decoder layers with an `mlp` attribute; "
                          f"llama-expert supports Llama-family models (Llama, Mistral, Qwen2, SmolLM2).")
    return best


def is_augmented(model: nn.Module) -> bool:
    return hasattr(model, _STATE)


def adapters(model: nn.Module) -> List[Tuple[str, MoEAdapter]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEAdapter)]


def augment_model(model: nn.Module, config: ExpertConfig) -> nn.Module:
    """Freeze every base parameter and put an MoE adapter beside each decoder layer's MLP (in place).

    Adapter weights are float32 whatever the base dtype (as PEFT does for LoRA): their updates are
    tiny compared with the weights, and bf16 would round many of them away.
    """
    if is_augmented(model):
        raise ConfigError("this model already carries MoE adapters; call remove_adapters(model) first.")
    check_config(config)  # the names of its strategies; types and ranges were checked when it was made
    layers = decoder_layers(model)
    hidden_size = model.config.hidden_size
    counts = experts_per_layer(config, len(layers))
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    token_mask = TokenMask()
    for layer, num_experts in zip(layers, counts):
        device = next(layer.mlp.parameters()).device
        with torch.device(device):  # build in place: works for CPU, CUDA and the meta device alike
            adapter = MoEAdapter(layer.mlp, hidden_size, num_experts, config, token_mask)
        adapter.train(model.training)  # a new module starts in training mode; follow the model's mode
        layer.mlp = adapter

    def remember_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        token_mask.set(mask)

    layer_adapters = [layer.mlp for layer in layers]

    def open_pass(module, args, kwargs):  # the decode kernel's checks, once per forward pass for every layer
        if torch.compiler.is_compiling():  # host-side checks; a compiled pass takes the general path (adapter.py)
            return
        shape = pass_shape(args, kwargs)
        for adapter in layer_adapters:  # (object.__setattr__: nn.Module's costs more than the rest of the loop)
            object.__setattr__(adapter, "pass_kernel", adapter.kernel_for_pass(shape))

    def close_pass(module, args, output):  # always called, also when the pass raised
        for adapter in layer_adapters:
            if adapter.pass_kernel is not None:
                adapter.pass_kernel.prepare(None)
                object.__setattr__(adapter, "pass_kernel", None)

    hooks = [model.register_forward_pre_hook(remember_mask, with_kwargs=True)]
    if any(adapter.router.sequence_level for adapter in layer_adapters):  # only these pay for the prefix state
        carrier = PrefixCarrier(token_mask)  # (the pass's state before open_pass: the kernels set up their sums)
        hooks += [model.register_forward_pre_hook(carrier.open, with_kwargs=True),
                  model.register_forward_hook(carrier.close, with_kwargs=True, always_call=True)]
    hooks += [model.register_forward_pre_hook(open_pass, with_kwargs=True),
              model.register_forward_hook(close_pass, always_call=True)]
    setattr(model, _STATE, {"hooks": hooks, "requires_grad": requires_grad, "token_mask": token_mask})
    model.expert_config = config
    if config.use_gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def pass_shape(args, kwargs) -> Optional[Tuple[int, int]]:
    """(batch, new tokens) of a model call's ``input_ids`` or ``inputs_embeds``, or None when it has neither."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    return (int(tokens.shape[0]), int(tokens.shape[1])) if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 \
        else None


@contextmanager
def domain_labels(model: nn.Module, labels):
    """Inside the block, every forward pass of ``model`` routes its sequences with these domain labels: ``labels``
    [B] holds one domain index per sequence of each pass (an int: every sequence). Only routers that route by the
    label read them (``oracle``); for others, for a model without adapters and for ``labels=None`` nothing
    changes. Why a context and not a forward argument: Transformers' forward does not carry extra arguments down
    to the MLPs; the labels sit beside the attention mask in the pass context (the ``TokenMask``)."""
    if labels is None or not is_augmented(model):
        yield
        return
    token_mask = getattr(model, _STATE)["token_mask"]
    before, token_mask.domain_labels = token_mask.domain_labels, labels
    try:
        yield
    finally:
        token_mask.domain_labels = before


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take the adapters out and restore the base model exactly as it was given to augment_model."""
    if not is_augmented(model):
        raise ConfigError("this model carries no MoE adapters.")
    for layer in decoder_layers(model):
        if isinstance(layer.mlp, MoEAdapter):
            layer.mlp = layer.mlp.base_mlp
    state = getattr(model, _STATE)
    for hook in state["hooks"]:
        hook.remove()
    for name, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"].get(name, p.requires_grad))
    delattr(model, _STATE)
    del model.expert_config
    return model


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the trained tensors (routers, experts, scales), keyed by their full module path."""
    state = {}
    for prefix, adapter in adapters(model):
        for name, p in adapter.named_parameters():
            if not name.startswith("base_mlp."):
                state[f"{prefix}.{name}"] = p.detach()
    return state


def planned_adapter_state(model: nn.Module, config: ExpertConfig) -> Dict[str, torch.Tensor]:
    """What ``adapter_state_dict`` would hold after ``augment_model(model, config)``, as meta tensors (shapes, no
    data). Why the meta device: the shapes come from the very code that builds the adapters, yet nothing is
    allocated, so an adapter file whose config asks for 10^6 experts is refused before it costs any memory."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = decoder_layers(model)
    state = {}
    for layer, num_experts in zip(layers, experts_per_layer(config, len(layers))):
        with torch.device("meta"):
            adapter = MoEAdapter(layer.mlp, model.config.hidden_size, num_experts, config)
        state.update({f"{names[id(layer.mlp)]}.{name}": p for name, p in adapter.named_parameters()
                      if not name.startswith("base_mlp.")})
    return state


def adapter_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for _, adapter in adapters(model) for name, p in adapter.named_parameters()
            if not name.startswith("base_mlp.")]


def router_losses(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Mean over MoE layers of the load-balancing and z losses of the last forward pass."""
    mods = [a for _, a in adapters(model)]
    if not mods or mods[0].aux_loss is None:
        raise RuntimeError("no router losses: run a forward pass of the augmented model first, in training mode "
                           "or with gradients enabled (eval passes under torch.no_grad skip them).")
    return {"aux_loss": torch.stack([a.aux_loss for a in mods]).mean(),
            "z_loss": torch.stack([a.z_loss for a in mods]).mean()}


def weighted_router_loss(model: nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``aux_coef * mean_l L_aux + z_coef * mean_l L_z`` plus, for each registered router loss whose coefficient is
    above 0 (``losses.register_router_loss``: ``mi_loss``), ``coef * mean_l L`` (docs/design.md section 2), and the
    raw losses.

    The first value is what training adds to the LM loss; the second holds ``aux_loss``, ``z_loss`` and the
    registered losses in use, for logging (``aux_loss`` is 1 for perfectly balanced routing).
    """
    config: ExpertConfig = model.expert_config
    losses = router_losses(model)
    weighted = config.router_aux_loss_coef * losses["aux_loss"] + config.router_z_loss_coef * losses["z_loss"]
    for name, (coefficient, _) in ROUTER_LOSSES.items():
        if getattr(config, coefficient) > 0:
            losses[name] = torch.stack([a.router.extra_losses[name] for _, a in adapters(model)]).mean()
            weighted = weighted + getattr(config, coefficient) * losses[name]
    return weighted, losses


def reset_routing_statistics(model: nn.Module) -> None:
    for _, adapter in adapters(model):
        adapter.router.reset_statistics()


def parameter_counts(model: nn.Module) -> Dict[str, object]:
    """Trainable parameters by kind, the frozen base, and ``router_state``: adapter tensors saved with the
    adapter but not trained (the aux_free router's selection bias), counted in neither."""
    routers = experts = scales = router_state = 0
    per_layer = []
    for _, adapter in adapters(model):
        routers += sum(p.numel() for p in adapter.router.parameters() if p.requires_grad)
        router_state += sum(p.numel() for p in adapter.router.parameters() if not p.requires_grad)
        experts += sum(p.numel() for p in adapter.experts.parameters() if p.requires_grad)
        scales += adapter.residual_scale.numel()
        per_layer.append(adapter.num_experts)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable - router_state,
            "routers": routers, "experts": experts, "scales": scales, "router_state": router_state,
            "trainable_percent": 100.0 * trainable / total if total else 0.0,
            "experts_per_layer": per_layer}


def parameter_report(model: nn.Module) -> str:
    """A printable breakdown: routers, experts, scales, frozen and the trainable share."""
    c = parameter_counts(model)
    rows = [("routers (W_g[, W_noise])", c["routers"]), ("experts (A, B, cores)", c["experts"]),
            ("residual scales (alpha_l)", c["scales"]), ("trainable total", c["trainable"]),
            ("frozen base", c["frozen"]), ("all parameters", c["total"])]
    if c["router_state"]:  # saved, not trained
        rows.insert(-1, ("router biases (untrained)", c["router_state"]))
    lines = ["Parameter breakdown", "-" * 44]
    lines += [f"{label:<26}{value:>18,}" for label, value in rows]
    lines.append(f"{'trainable share':<26}{c['trainable_percent']:>17.4f}%")
    if c["experts_per_layer"]:
        lines.append(f"experts per layer: {c['experts_per_layer']} "
                     f"({sum(c['experts_per_layer'])} in {len(c['experts_per_layer'])} layers)")
    return "\n".join(lines)
