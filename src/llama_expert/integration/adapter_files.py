"""Adapter folders in PEFT's habit: ``adapter_config.json`` + ``adapter_model.safetensors``.

The JSON records the format version, the base model (``base_model_name_or_path``), a fingerprint of the
base architecture, and the ExpertConfig. Loading onto a base with another architecture fails with a
message naming both; the same architecture with different weights only warns (a fine-tuned sibling
is a legitimate base). Each file is written to a temporary name and renamed, so a crash never leaves a
half-written file; the weights go first, so a crash between the two leaves the old config beside the new
weights of the same shapes (checkpoints, which must be consistent, are written as whole folders).
"""

from __future__ import annotations

import hashlib
import json
import reprlib
import warnings
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import ExpertConfig
from ..errors import AdapterError, ConfigError
from ..files import atomic_write, atomic_write_text
from ..modeling import check_config, experts_per_layer
from .adapter_fit import check_config_fits, check_model_fits
from .base_models import DEFAULT_MODEL, load_base_model
from .surgery import adapter_state_dict, adapters, augment_model, is_augmented
from .weights_file import header_tensors, load_finite

# Version 2 renamed the learnable per-layer scale: tensor ``*.scale`` -> ``*.residual_scale`` and config
# field ``scale_init`` -> ``residual_scale_init``, and dropped the unused ``extra`` field. Version 1
# adapters are read through ``_upgrade_v1_config`` and ``_upgrade_v1_tensors``. Version 3 stores each
# ``*.residual_scale`` with shape [1] instead of a 0-d scalar (FSDP2 shards no 0-d tensor); older ones are
# reshaped when read (``_upgrade_v2_tensors``). Version 4 adds a prototype router's ``spread_slope`` and
# ``null_slope`` (the null's threshold by prefix length); older ones get zeros, their fixed threshold
# (``_upgrade_v3_tensors``).
FORMAT_VERSION = 4
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MIX_REPORT = "mix_report.json"  # what ``mix`` writes beside a mixed adapter; its ``experts`` names the experts
PRUNE_REPORT = "prune_report.json"  # what ``prune`` writes; ``--keep-experts`` of a mix names the experts kept
_JSON_NAMES = {int: "integer", dict: "object", str: "string"}
_ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")


def architecture_fingerprint(model: nn.Module) -> dict:
    return {f: getattr(model.config, f, None) for f in _ARCH_FIELDS}


def weights_checksum(model: nn.Module) -> str:
    """A cheap digest of the input embeddings: tells two bases of the same shape apart ("" when unknown).

    Under FSDP2 the embeddings are a DTensor sharded by rows and only rank 0 holds the first rows; reading
    them there needs no collective, so a checkpoint written by rank 0 alone still records the digest. The
    other ranks return "" (the check is skipped there)."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "unquantized_sample", None)  # a 4-bit table keeps the corner it was made from
    weight = embedding.weight if weight is None else weight
    if hasattr(weight, "to_local"):  # a DTensor
        local = weight.to_local()
        first_rows = getattr(weight.placements[0], "dim", None) == 0 and weight.device_mesh.get_local_rank() == 0
        if not first_rows or local.shape[0] < 16:
            return ""
        weight = local
    if weight.device.type == "meta":
        return ""
    # Through bfloat16, so the same model loaded in float32 or bfloat16 gives the same digest.
    sample = weight[:16, :64].detach().to(torch.bfloat16).float().cpu().numpy()
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


def save_adapter(model: nn.Module, folder: Union[str, Path], base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the trained tensors and the config of an augmented model to ``folder``."""
    if not is_augmented(model):
        raise AdapterError("this model carries no MoE adapters; call augment_model(model, config) first.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "llama-expert",
        "peft_type": "LLAMA_EXPERT_MOE",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "base_model_architecture": architecture_fingerprint(model),
        "base_model_weights_checksum": weights_checksum(model),
        "expert_config": _config_with_counts(model),
    }
    atomic_write_text(folder / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def _config_with_counts(model: nn.Module) -> dict:
    """The model's ExpertConfig, with the explicit per-layer expert counts when its allocation rule no longer
    gives them (pruned, or grown by dynamic allocation): the file must rebuild exactly these tensors."""
    config = model.expert_config.to_dict()
    counts = [adapter.num_experts for _, adapter in adapters(model)]
    if experts_per_layer(model.expert_config, len(counts)) != counts:
        config["expert_allocation"] = counts
        config["num_experts"] = max(config["num_experts"], max(counts))
    return config


def read_config_json(folder: Union[str, Path]) -> dict:
    """The JSON object in ``folder/adapter_config.json`` of a complete adapter folder (either kind: both keep their
    weights in ``adapter_model.safetensors``). Missing weights are named first, before the base the config names
    is looked for: a folder that kept only its config would otherwise fail on a base path from another machine."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}. Pass the --output-dir of a `train` run "
                           f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME}).")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} holds no {CONFIG_NAME}; it is not a llama-expert adapter folder.")
    if not (folder / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{folder} holds no {WEIGHTS_NAME}: the adapter's weights are not here, only its "
                           f"config. Copy the weights file beside {CONFIG_NAME}, or re-train the adapter.")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc}); the adapter is corrupt. Re-save it.") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} holds a JSON {type(meta).__name__}, not an object with the adapter's settings; "
                           f"the adapter is corrupt. Re-save it.")
    return meta


# ``peft_type`` in adapter_config.json -> the kind of adapter (the loaders are registered by kind)
ADAPTER_KINDS = {"LLAMA_EXPERT_MOE": "moe", "LORA": "lora"}


def adapter_kind(folder: Union[str, Path]) -> str:
    """'moe' (llama-expert MoE adapters) or 'lora' (a PEFT LoRA), as the folder's ``peft_type`` says."""
    peft_type = read_config_json(folder).get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in ADAPTER_KINDS:
        found = f"peft_type {reprlib.repr(peft_type)}" if peft_type is not None else "no peft_type"
        raise AdapterError(f"{Path(folder) / CONFIG_NAME} records {found}; llama-expert loads its own MoE adapters "
                           f"(LLAMA_EXPERT_MOE) and PEFT LoRA adapters (LORA). Pass a folder that `train` or "
                           f"`distill` wrote.")
    return ADAPTER_KINDS[peft_type]


def expert_names(folder: Union[str, Path], count: int) -> Optional[List[str]]:
    """The names ``mix`` (or ``prune --keep-experts`` of a mix) recorded for the ``count`` experts of the adapter in
    ``folder`` (its branches' folder names), or None: no names recorded, or not ``count`` of them (the file does not
    describe these experts)."""
    for report in (MIX_REPORT, PRUNE_REPORT):
        try:
            names = json.loads((Path(folder) / report).read_text()).get("experts")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(names, list) and len(names) == count and all(isinstance(n, str) and n for n in names):
            return names
    return None


def recorded_base(folder: Union[str, Path]) -> Optional[str]:
    """The base model that the adapter in ``folder`` (either kind) records, or None when it records none."""
    base = read_config_json(folder).get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{Path(folder) / CONFIG_NAME} records base_model_name_or_path {base!r}, not a name; "
                           f"pass the base model with --model.")
    return base or None


# what each field of adapter_config.json must be, where present (the file is untrusted input)
_META_TYPES = {"format_version": int, "expert_config": dict, "base_model_name_or_path": str,
               "base_model_architecture": dict, "base_model_weights_checksum": str}


def read_adapter_config(folder: Union[str, Path]) -> dict:
    """The settings of the MoE adapter in ``folder``, upgraded to the current format version."""
    path = Path(folder) / CONFIG_NAME
    meta = read_config_json(folder)
    for field, kind in _META_TYPES.items():
        value = meta.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise AdapterError(f"{path} holds {field} {reprlib.repr(value)}, not a JSON {_JSON_NAMES[kind]}: the file "
                               f"was damaged or edited. Restore it, or re-save the adapter.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{path} has format version {meta['format_version']}, newer than this llama-expert "
                           f"understands ({FORMAT_VERSION}). Upgrade llama-expert.")
    if "expert_config" not in meta:
        raise AdapterError(f"{path} has no 'expert_config'; it is not a llama-expert adapter.")
    if meta.get("format_version", 1) < 2:
        meta = {**meta, "expert_config": _upgrade_v1_config(meta["expert_config"])}
    return meta


def saved_expert_config(meta: dict, folder: Union[str, Path]) -> ExpertConfig:
    """The ExpertConfig that ``meta`` (``read_adapter_config``) records, with its values and strategy names checked."""
    try:
        config = ExpertConfig.from_dict(meta["expert_config"])
        check_config(config)
    except (ConfigError, TypeError) as exc:
        raise AdapterError(f"{Path(folder) / CONFIG_NAME} holds an invalid expert_config: {exc} Restore the "
                           f"expert_config saved with these weights, or re-save the adapter.") from exc
    return config


def _upgrade_v1_config(config: dict) -> dict:
    config = {k: v for k, v in config.items() if k != "extra"}
    config.setdefault("router_type", "noisy_top_k")  # version 1 had this one router and did not record it
    if "scale_init" in config:
        config["residual_scale_init"] = config.pop("scale_init")
    return config


def _upgrade_v1_tensors(state: dict) -> dict:
    return {(k[: -len(".scale")] + ".residual_scale" if k.endswith(".scale") else k): v for k, v in state.items()}


def _upgrade_v2_tensors(state: dict) -> dict:
    return {k: v.reshape(1) if k.endswith(".residual_scale") and v.dim() == 0 else v for k, v in state.items()}


def _upgrade_v3_tensors(state: dict) -> dict:
    """A prototype router's spread became ``spread + spread_slope / n`` and its null's threshold ``null_distance +
    null_slope / n`` (n: the prefix's length): slopes of zero give back the version-3 routing exactly."""
    added = {}
    for key, value in state.items():
        for old, new in ((".router.spread", ".router.spread_slope"), (".router.null_distance", ".router.null_slope")):
            if key.endswith(old) and key[: -len(old)] + new not in state:
                added[key[: -len(old)] + new] = torch.zeros_like(value)
    return {**state, **added}


def _upgrade_tensors(state: dict, meta: dict) -> dict:
    """Tensors (or meta tensors of the header) of an older format version, named and shaped as now."""
    if meta.get("format_version", 1) < 2:
        state = _upgrade_v1_tensors(state)
    if meta.get("format_version", 1) < 3:
        state = _upgrade_v2_tensors(state)
    if meta.get("format_version", 1) < 4:
        state = _upgrade_v3_tensors(state)
    return state


def check_base_matches(model: nn.Module, meta: dict, folder: Union[str, Path]) -> None:
    saved = meta.get("base_model_architecture") or {}
    here = architecture_fingerprint(model)
    diff = {k: (saved.get(k), here.get(k)) for k in _ARCH_FIELDS if k in saved and saved.get(k) != here.get(k)}
    if diff:
        details = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
        raise AdapterError(f"the adapter in {folder} was saved for base model "
                           f"'{meta.get('base_model_name_or_path')}', whose architecture differs from this "
                           f"model ({details}). Load it with --model {meta.get('base_model_name_or_path')}.")
    saved_sum, here_sum = meta.get("base_model_weights_checksum"), weights_checksum(model)
    if saved_sum and here_sum and saved_sum != here_sum:
        warnings.warn(f"the adapter in {folder} was trained on '{meta.get('base_model_name_or_path')}', which has "
                      f"the same architecture as this base but different weights; results may differ.")


def load_adapter_weights(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Augment ``model`` with the config stored in ``folder`` and load its trained tensors exactly.

    The folder is untrusted input: the shapes its config implies are compared with the weights file's header
    before any adapter is built (a config edited to ask for 10^6 experts is refused without allocating them),
    and weights holding NaN or inf are refused."""
    meta = read_adapter_config(folder)
    check_base_matches(model, meta, folder)
    config = saved_expert_config(meta, folder)
    weights = Path(folder) / WEIGHTS_NAME  # present: read_adapter_config checked
    found = _upgrade_tensors(header_tensors(weights), meta)
    augmented_here = not is_augmented(model)
    if augmented_here:
        check_config_fits(model, config, found, Path(folder) / CONFIG_NAME)
    else:
        check_model_fits(adapter_state_dict(model), found, weights)
    state = _upgrade_tensors(load_finite(weights), meta)
    if augmented_here:
        augment_model(model, config)
    with torch.no_grad():
        for key, target in adapter_state_dict(model).items():
            target.copy_(state[key].to(device=target.device, dtype=target.dtype))
    return model


def load_augmented_model(model_id: Optional[str] = None, adapter_path: Optional[Union[str, Path]] = None,
                         config: Optional[ExpertConfig] = None, use_auth_token: Optional[str] = None,
                         dtype=None, device: Optional[str] = None) -> Tuple[nn.Module, ExpertConfig]:
    """Return ``(model, config)``: the base (by default the one the adapter records) with MoE adapters.

    With ``adapter_path`` the trained adapter is loaded; without it fresh adapters are built from
    ``config`` (default ExpertConfig()), which compute exactly the base model until trained.
    """
    meta = read_adapter_config(adapter_path) if adapter_path is not None else None
    if model_id is None and meta is not None:
        model_id = meta.get("base_model_name_or_path")
        if not model_id:
            raise AdapterError(f"the adapter in {adapter_path} does not record its base model; pass model_id "
                               f"(--model) explicitly.")
    model_id = model_id or DEFAULT_MODEL
    if meta is not None and config is not None:
        raise ConfigError("pass either adapter_path or config: an adapter carries its own ExpertConfig.")
    config = config or ExpertConfig()
    saved = saved_expert_config(meta, adapter_path) if meta is not None else config  # checked before the base loads
    model = load_base_model(model_id, auth_token=use_auth_token, dtype=dtype, device=device,
                            quantization_4bit=saved.quantization_4bit)
    if meta is not None:
        load_adapter_weights(model, adapter_path)
    else:
        augment_model(model, config)
    return model, model.expert_config
