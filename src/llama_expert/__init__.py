"""llama-expert: Mixture-of-Experts LoRA adapters beside the MLPs of a frozen Llama-family model."""

from .adapter import MoEAdapter
from .adapter_files import load_adapter_weights, load_augmented_model, save_adapter
from .config import ExpertConfig
from .errors import AdapterError, ConfigError, DataError, LlamaExpertError, ModelLoadError
from .benchmark import ExpertModelBenchmark, compare_throughput
from .experts import SharedCoreExperts, SharedDownExperts
from .generate import generate_text, interactive_session
from .models import DEFAULT_MODEL, load_base_model, load_tokenizer
from .routing import NoisyTopKGating, load_balancing_loss, router_z_loss
from .surgery import (adapter_parameters, augment_model, parameter_counts, parameter_report, remove_adapters,
                      router_losses, weighted_router_loss)
from .train import fine_tune_augmented_model
from .trainer import TrainingArguments, TrainResult

__version__ = "0.1.0"

__all__ = [
    "ExpertConfig", "augment_model", "remove_adapters", "parameter_report", "parameter_counts", "router_losses",
    "weighted_router_loss", "adapter_parameters", "save_adapter", "load_adapter_weights", "load_augmented_model",
    "load_base_model", "load_tokenizer", "DEFAULT_MODEL", "MoEAdapter", "NoisyTopKGating", "SharedCoreExperts",
    "SharedDownExperts", "load_balancing_loss", "router_z_loss", "LlamaExpertError", "ConfigError",
    "ModelLoadError", "AdapterError", "DataError", "ExpertModelBenchmark", "compare_throughput", "generate_text",
    "interactive_session", "fine_tune_augmented_model", "TrainingArguments", "TrainResult",
]
