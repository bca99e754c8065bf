"""llama-expert: Mixture-of-Experts LoRA adapters beside the MLPs of a frozen Llama-family model.

The public API is imported lazily (PEP 562): ``import llama_expert`` costs nothing until a name is used,
so ``llama-expert --help`` stays fast. The package is built in floors and imports point down only
(errors/config -> modeling -> integration/data/metrics -> training/evaluation/inference -> comparison/lifecycle
-> cli); see docs/design.md section 7.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    "ExpertConfig": "config",
    "LlamaExpertError": "errors", "ConfigError": "errors", "ModelLoadError": "errors", "AdapterError": "errors",
    "DataError": "errors",
    "MoEAdapter": "modeling", "NoisyTopKGating": "modeling", "SharedCoreExperts": "modeling",
    "SharedDownExperts": "modeling", "load_balancing_loss": "modeling", "router_z_loss": "modeling",
    "ROUTERS": "modeling", "EXPERT_BANKS": "modeling", "ALLOCATIONS": "modeling",
    "augment_model": "integration.surgery", "remove_adapters": "integration.surgery",
    "parameter_report": "integration.surgery", "parameter_counts": "integration.surgery",
    "router_losses": "integration.surgery", "weighted_router_loss": "integration.surgery",
    "adapter_parameters": "integration.surgery", "domain_labels": "integration.surgery",
    "save_adapter": "integration.adapter_files", "load_adapter_weights": "integration.adapter_files",
    "load_augmented_model": "integration.adapter_files",
    "load_base_model": "integration.base_models", "load_tokenizer": "integration.base_models",
    "DEFAULT_MODEL": "integration.base_models",
    "TrainingArguments": "training.arguments", "DataArguments": "training.arguments",
    "TrainResult": "training.trainer", "fine_tune_augmented_model": "training.recipe",
    "fine_tune_lora_model": "training.recipe",
    "ExpertModelBenchmark": "evaluation.benchmark", "compare_throughput": "evaluation.throughput",
    "generate_text": "inference.generation", "interactive_session": "inference.chat",
    "KVCacheCompressor": "integration.kv_cache",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_expert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .config import ExpertConfig  # noqa: F401
    from .evaluation.benchmark import ExpertModelBenchmark  # noqa: F401
    from .integration.adapter_files import load_augmented_model, save_adapter  # noqa: F401
    from .integration.kv_cache import KVCacheCompressor  # noqa: F401
    from .integration.surgery import augment_model  # noqa: F401
    from .training.recipe import fine_tune_augmented_model  # noqa: F401
