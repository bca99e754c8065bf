"""Does an adapter file fit? The shapes its ExpertConfig implies, compared with its weights file's header.

An adapter folder is untrusted input: its config could ask for 10^6 experts of rank 10^6, and building those
first would take the machine's memory before any check. So the adapters the config implies are planned on
the meta device (``surgery.planned_adapter_state``: the building code, no memory) and compared, name by name and
shape by shape, with the meta tensors of the weights file's header (``weights_file.header_tensors``). A
mismatch names the expert_config fields behind it, so a user knows which value was edited.
"""

from __future__ import annotations

import reprlib
from itertools import zip_longest
from pathlib import Path

from torch import nn

from ..config import ExpertConfig
from ..errors import AdapterError, ConfigError
from ..modeling import experts_per_layer
from .surgery import decoder_layers, planned_adapter_state

_FIX = "Restore the expert_config saved with these weights, or re-save the adapter."


def check_config_fits(model: nn.Module, config: ExpertConfig, found: dict, config_path: Path) -> None:
    """Refuse a saved config whose adapters on ``model`` would not hold exactly the tensors ``found`` (meta tensors
    of the weights file), naming the expert_config fields to check; nothing is allocated."""
    try:
        expected = planned_adapter_state(model, config)
    except ConfigError as exc:  # e.g. an expert_allocation list of another length than the model's layers
        raise AdapterError(f"{config_path} holds an expert_config that does not fit this base: {exc} {_FIX}") from exc
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{config_path} does not fit its weights: expert_type {config.expert_type!r} and "
                           f"router_type {config.router_type!r} imply tensors the weights lack {missing[:2]} or the "
                           f"weights hold others {unexpected[:2]}. {_FIX}")
    for key, tensor in expected.items():
        implied, held = tuple(tensor.shape), tuple(found[key].shape)
        if implied != held:
            fields = _fields_behind(model, config, implied, held)
            raise AdapterError(f"{config_path} does not fit its weights: {fields} implies tensor {key} of shape "
                               f"{implied}, the weights hold {held}. {_FIX}")


def _fields_behind(model: nn.Module, config: ExpertConfig, implied: tuple, held: tuple) -> str:
    """The expert_config fields, with their values, that set the dimensions where ``implied`` and ``held`` differ."""
    differ = {a for a, b in zip_longest(implied, held) if a != b}
    count_field = "expert_allocation" if isinstance(config.expert_allocation, list) else "num_experts"
    sources = {count_field: set(experts_per_layer(config, len(decoder_layers(model)))),
               "lora_r": {config.lora_r}, "expert_hidden_size": {config.expert_hidden_size},
               "expert_rank": {config.expert_rank}, "shared_expert_rank": {config.shared_expert_rank}}
    named = [f"{field}={reprlib.repr(getattr(config, field))}" for field, values in sources.items() if values & differ]
    return "expert_config's " + (" and ".join(named) or "num_experts, expert_allocation, lora_r, expert_hidden_size, "
                                                        "expert_rank or shared_expert_rank")


def check_model_fits(expected: dict, found: dict, weights: Path) -> None:
    """Refuse weights whose tensors differ from those of the adapters ``model`` already carries."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong_shape = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else \
            f"tensor {wrong_shape[0]} has shape {tuple(found[wrong_shape[0]].shape)}, the model expects " \
            f"{tuple(expected[wrong_shape[0]].shape)}"
        raise AdapterError(f"{weights} does not fit this model ({detail}): it was saved with another ExpertConfig "
                           f"or for another base. Load it onto the base it records, or re-save it.")
