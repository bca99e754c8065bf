"""The plain-LoRA baseline: PEFT LoRA on the MLP projections (the recipe trains it as the ``lora`` method).

``compare`` uses it to answer the one question that matters: do the MoE adapters beat plain LoRA at the
same trainable-parameter budget? ``matched_lora_rank`` picks the LoRA rank whose parameter count is
closest to a given budget.

It lives on the integration floor, not in training, because loading a LoRA folder is integration's job:
``load_model_and_tokenizer`` (inference, serve, benchmark) and ``export`` load what ``train --method lora`` and
``distill`` write.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from .weights_file import load_finite

LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("the LoRA baseline needs PEFT: pip install peft") from exc
    return peft


def lora_parameters_per_rank(model, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Trainable parameters one unit of LoRA rank adds: ``in + out`` features per targeted Linear."""
    import torch.nn as nn

    return sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] in targets)


def matched_lora_rank(model, budget: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    per_rank = lora_parameters_per_rank(model, targets)
    if per_rank == 0:
        raise ConfigError(f"the model has no Linear layers named {list(targets)} to put LoRA on.")
    return max(1, round(budget / per_rank))


def add_lora(model, rank: int, alpha: Optional[float] = None, dropout: float = 0.05,
             targets: Sequence[str] = LORA_TARGETS):
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout,
                             target_modules=list(targets), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def save_lora(model, folder) -> None:
    model.save_pretrained(str(folder))


def load_lora_weights(model, folder) -> None:
    """Load a saved LoRA state into a PeftModel built with the same config (used when resuming)."""
    _peft().set_peft_model_state_dict(model, load_finite(Path(folder) / WEIGHTS_NAME))


def holds_lora(folder) -> bool:
    """Whether ``folder``'s adapter_config.json is PEFT's, for a LoRA (an MoE adapter's records an expert_config)."""
    try:
        return json.loads((Path(folder) / "adapter_config.json").read_text()).get("peft_type") == "LORA"
    except (OSError, ValueError, AttributeError):
        return False


def read_lora_config(folder):
    """The PEFT ``LoraConfig`` saved in ``folder``; a folder that holds no PEFT LoRA is refused in one line."""
    if not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(f"{folder} holds no PEFT adapter_config.json; pass a folder written by "
                          f"`llama-expert train --method lora` or PEFT's save_pretrained.")
    if not holds_lora(folder):
        raise ConfigError(f"{folder} holds no PEFT LoRA (an MoE adapter is continued with --method moe, and "
                          f"loaded with --adapter).")
    return _peft().PeftConfig.from_pretrained(str(folder))


def continue_lora(base_model, folder, dropout: Optional[float] = None):
    """A base model with the LoRA in ``folder`` loaded trainable, to train further (a LoRA trained domain after
    domain); ``dropout`` replaces the saved one when given."""
    config = read_lora_config(folder)
    config.inference_mode = False
    if dropout is not None:
        config.lora_dropout = dropout
    load_finite(Path(folder) / WEIGHTS_NAME)
    return _from_pretrained(base_model, folder, config=config, is_trainable=True)


def load_lora_model(base_model, folder):
    """A base model with the LoRA adapter in ``folder`` (as saved by PEFT), in eval mode."""
    read_lora_config(folder)
    load_finite(Path(folder) / WEIGHTS_NAME)  # PEFT would load NaN or inf silently
    return _from_pretrained(base_model, folder).eval()


def _from_pretrained(base_model, folder, **kwargs):
    with warnings.catch_warnings():  # PEFT reads Transformers' deprecated is_gradient_checkpointing: not for users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _peft().PeftModel.from_pretrained(base_model, str(folder), **kwargs)


# What a plain LoRA on the MLP may set (its shapes, scaling, where it goes, bookkeeping); any other field of
# adapter_config.json away from PEFT's default (DoRA, aLoRA, biases, per-module alphas, layer replication, ...) changes
# what the LoRA computes in a way the mixlora bank does not, and is refused. Read from the file itself: PEFT drops, with
# a warning only, the fields of a newer PEFT it does not know.
PLAIN_FIELDS = {"r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "use_rslora", "rank_pattern",
                "layers_to_transform", "layers_pattern", "fan_in_fan_out", "task_type", "peft_type", "auto_mapping",
                "peft_version", "base_model_name_or_path", "revision", "inference_mode",
                "runtime_config", "megatron_core", "qalora_group_size"}  # the last three: no effect on their own
PLAIN_STARTS = (True, False, "gaussian", "eva")  # initialisations that leave the base weights as they are


def plain_lora_departure(saved: dict) -> Optional[str]:
    """What in a saved PEFT LoRA config (adapter_config.json) makes it more than a plain LoRA, or None."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(_peft().LoraConfig)}
    for name, value in saved.items():
        if name == "init_lora_weights":
            if value not in PLAIN_STARTS:
                return f"init_lora_weights={value!r} (a start that changes the base's weights)"
        elif name not in defaults:
            return f"{name}={value!r}, which this PEFT does not know (saved by a newer one?)"
        elif name not in PLAIN_FIELDS and value != json.loads(json.dumps(defaults[name], default=str)):
            return f"{name}={value!r}"
    return None


LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(\w+)\.lora_([AB])\.weight$")  # PEFT's saved names


def mlp_lora_layers(folder, layers: int) -> List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """The PEFT LoRA in ``folder`` as what a mix puts inside each layer's MLP (``modeling`` bank ``mixlora``): per
    decoder layer, for each projection it adapts (``gate_proj``, ``up_proj``, ``down_proj``), ``(A [r, in],
    (s B)^T [r, out])`` with PEFT's scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) folded in, so
    that the projection plus ``x A^T (s B)^T`` is the LoRA's projection exactly. A LoRA elsewhere (attention), DoRA,
    trained biases or per-module alphas have no place in that bank and are refused."""
    config = read_lora_config(folder)
    departure = plain_lora_departure(json.loads((Path(folder) / "adapter_config.json").read_text()))
    if departure:
        raise ConfigError(f"{folder} is a PEFT LoRA with {departure}: a mix takes plain LoRAs on the MLP projections "
                          f"{', '.join(LORA_TARGETS)}; train it with `llama-expert train --method lora`.")
    parts: List[Dict[str, Dict[str, torch.Tensor]]] = [{} for _ in range(layers)]
    for key, tensor in load_finite(Path(folder) / WEIGHTS_NAME).items():
        found = LORA_KEY.search(key)
        if not found or found.group(2) not in LORA_TARGETS or int(found.group(1)) >= layers:
            raise ConfigError(f"{folder} holds {key}, which a mix cannot place: it takes LoRAs on the MLP projections "
                              f"{', '.join(LORA_TARGETS)} of a {layers}-layer model; train the LoRA with "
                              f"`llama-expert train --method lora` (those targets) on this base.")
        parts[int(found.group(1))].setdefault(found.group(2), {})[found.group(3)] = tensor.float()
    return [{target: _folded(pair, config, folder, target) for target, pair in layer.items()} for layer in parts]


def _folded(pair: Dict[str, torch.Tensor], config, folder, target: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, (s B)^T)`` of one projection's LoRA."""
    if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
        shapes = {k: tuple(v.shape) for k, v in pair.items()}
        raise ConfigError(f"{folder}: the {target} LoRA's A and B do not pair ({shapes}); the weights file is damaged. "
                          f"Save the LoRA again.")
    rank = pair["A"].shape[0]
    scale = config.lora_alpha / (math.sqrt(rank) if config.use_rslora else rank)
    return pair["A"].clone(), (pair["B"] * scale).t().contiguous()
