"""What every command that runs a model takes: a base model, perhaps an adapter, a token, a dtype, a device.

``ModelArguments`` holds those settings (the CLI flags are generated from it) and
``load_model_and_tokenizer`` resolves them: a base model id, an adapter folder in place of the model
(``--model-path ./models/llama-expert`` as in the seed), or a base plus ``--adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from ..options import option
from .adapter_files import CONFIG_NAME, adapter_kind, load_augmented_model, recorded_base
from .base_models import DEFAULT_MODEL, load_base_model, load_tokenizer
from .devices import check_device
from .peft_lora import load_lora_model
from .surgery import is_augmented


@dataclass
class ModelArguments:
    model: Optional[str] = option(
        None, "base model (Hub id, local folder, .gguf file, or smollm2-135m) or an adapter folder; default: the "
              "base an adapter records, else smollm2-135m", flag="--model", aliases=("--model-path", "--base-model"))
    adapter: Optional[str] = option(None, "adapter folder for the base model: MoE adapters or a PEFT LoRA (written by "
                                          "`train`, `train --method lora` or `distill`)",
                                    aliases=("--augmented-model",))
    auth_token: Optional[str] = option(None, "Hugging Face token for gated or private models (else HF_TOKEN or "
                                             "the stored login)")
    dtype: Optional[str] = option(None, "base weights dtype: float32, bfloat16, float16 or auto (default float32)")
    device: Optional[str] = option(None, "cpu, cuda, cuda:1, ...; default: cuda when available, else cpu")


def is_adapter_folder(path: Optional[str]) -> bool:
    """True when ``path`` is a folder holding an ``adapter_config.json``."""
    return path is not None and (Path(path).expanduser() / CONFIG_NAME).is_file()


def default_device(device: Optional[str] = None) -> Optional[str]:
    """``device`` if given (and usable here), else ``"cuda"`` when a GPU is there, else None (the CPU)."""
    if device:
        check_device(device)
        return device
    return "cuda" if torch.cuda.is_available() else None


def load_moe_adapter(folder, base: str, auth_token=None, dtype=None, device=None):
    return load_augmented_model(base, adapter_path=folder, use_auth_token=auth_token, dtype=dtype, device=device)[0]


def load_peft_lora(folder, base: str, auth_token=None, dtype=None, device=None):
    return load_lora_model(load_base_model(base, auth_token=auth_token, dtype=dtype, device=device), folder)


# adapter kind (``adapter_files.adapter_kind``) -> ``loader(folder, base, auth_token=, dtype=, device=)``
ADAPTER_LOADERS = {"moe": load_moe_adapter, "lora": load_peft_lora}


def load_adapter(folder, base: Optional[str] = None, auth_token: Optional[str] = None, dtype=None,
                 device: Optional[str] = None):
    """``(model, base)``: the adapter in ``folder`` (MoE adapters, or a PEFT LoRA from `train --method lora` or
    `distill`) on ``base``, by default the base the adapter records. The folder is checked (config, weights)
    before any model loads."""
    kind = adapter_kind(folder)
    base = base or recorded_base(folder) or DEFAULT_MODEL
    return ADAPTER_LOADERS[kind](folder, base, auth_token=auth_token, dtype=dtype, device=device), base


def load_model_and_tokenizer(model: Optional[str] = None, adapter: Optional[str] = None,
                             auth_token: Optional[str] = None, dtype=None, device: Optional[str] = None,
                             augmented: bool = True):
    """Resolve a ``--model-path``/``--adapter`` pair (the fields of ``ModelArguments``); return
    ``(model, tokenizer, info)``.

    ``model`` is a base model (Hub id, folder, ``.gguf``, ``"smollm2-135m"``; None means the default,
    or the base an adapter records) or an adapter folder (one holding ``adapter_config.json``).
    ``adapter`` is an adapter folder for the base ``model_path``; an adapter is always loaded.
    Without one the base is augmented with fresh default adapters when ``augmented`` is true (they
    compute exactly the base until trained), else returned as is. The tokenizer is the base's.
    ``info`` says which case happened: ``base_model``, ``adapter``, ``augmented`` (MoE adapters: not a PEFT LoRA),
    ``fresh_adapter``.
    """
    model_path, device = model, default_device(device)
    if is_adapter_folder(model_path):
        if adapter is not None:
            raise ConfigError(f"--model-path {model_path} is an adapter folder and --adapter {adapter} is given "
                              f"too; pass the base model as --model-path with --adapter, or the "
                              f"adapter folder alone.")
        adapter, model_path = model_path, None
    if adapter is not None:
        loaded, base = load_adapter(adapter, model_path, auth_token=auth_token, dtype=dtype, device=device)
        info = {"base_model": base, "adapter": str(adapter), "augmented": is_augmented(loaded), "fresh_adapter": False}
    else:
        base = model_path or DEFAULT_MODEL
        if augmented:
            loaded, _ = load_augmented_model(base, use_auth_token=auth_token, dtype=dtype, device=device)
        else:
            loaded = load_base_model(base, auth_token=auth_token, dtype=dtype, device=device)
        info = {"base_model": base, "adapter": None, "augmented": bool(augmented), "fresh_adapter": bool(augmented)}
    loaded.eval()
    tokenizer = load_tokenizer(base, auth_token=auth_token)
    return loaded, tokenizer, info
