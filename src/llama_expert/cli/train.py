"""``llama-expert train``: fine-tune MoE adapters (or, ``--method lora``, the PEFT LoRA baseline)."""

from __future__ import annotations

import argparse
from typing import Optional

from ..config import ExpertConfig
from ..errors import ConfigError
from ..integration.adapter_files import recorded_base
from ..integration.loading import ModelArguments
from ..training.arguments import DataArguments, TrainingArguments
from ..training.methods import METHODS, AdapterStart
from ..training.trainer import TrainingInterrupted
from ..training.recipe import fine_tune
from ..options import flag_for
from .arguments import add_dataclass_arguments, dataclass_from_args, redacted_command, strategy_choices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ModelArguments, skip=("adapter", "device"), title="model")
    add_dataclass_arguments(parser, DataArguments, title="data")
    group = parser.add_argument_group("experts")
    group.add_argument("--method", default="moe", choices=METHODS.names(),
                       help="moe: MoE adapters; lora: the plain PEFT LoRA baseline (rank --lora-r on the MLP)")
    add_dataclass_arguments(group, ExpertConfig, choices=strategy_choices())
    add_dataclass_arguments(group, AdapterStart)
    add_dataclass_arguments(parser, TrainingArguments, title="training")


def refuse_ignored_flags(method_class, config: ExpertConfig) -> None:
    """One line naming every expert flag set away from its default that the chosen method does not read
    (``--method lora --router-type soft`` would otherwise train a LoRA as if the flag were never given)."""
    default = ExpertConfig()
    ignored = [flag_for(ExpertConfig, f) for f in ExpertConfig.__dataclass_fields__
               if f not in method_class.config_fields and getattr(config, f) != getattr(default, f)]
    if ignored:
        raise ConfigError(f"--method {method_class.name} does not use {', '.join(ignored)}; drop "
                          f"{'it' if len(ignored) == 1 else 'them'}, or train with --method moe.")


# what a run from an adapter may set differently: how it trains, not what the adapter computes
TRAINING_FIELDS = ("use_gradient_checkpointing", "quantization_4bit", "router_lr_multiplier", "router_aux_loss_coef",
                   "router_z_loss_coef", "router_mi_loss_coef", "aux_free_bias_rate", "lora_dropout")


def method_of(args: argparse.Namespace):
    """The training method the flags ask for: fresh adapters of --method, or the --init-adapter's (an MoE adapter, or
    with --method lora a LoRA), whose settings the expert flags may change only where they say how to train
    (``TRAINING_FIELDS``)."""
    config, start = dataclass_from_args(ExpertConfig, args), dataclass_from_args(AdapterStart, args)
    if start.init_adapter is None:
        start.check()
        refuse_ignored_flags(METHODS.get(args.method), config)
        if config.router_type == "prototype":
            raise ConfigError("--router-type prototype routes by the prototypes of adapters trained apart: make such "
                              "an adapter with `llama-expert mix`, and calibrate it with --init-adapter.")
        return METHODS.get(args.method).from_expert_config(config)
    default = ExpertConfig()
    changed = {f: getattr(config, f) for f in ExpertConfig.__dataclass_fields__
               if getattr(config, f) != getattr(default, f)}
    fixed = [flag_for(ExpertConfig, f) for f in changed if f not in TRAINING_FIELDS]
    if fixed:
        raise ConfigError(f"--init-adapter {start.init_adapter} brings its own expert settings; drop "
                          f"{', '.join(fixed)}.")
    method = METHODS.get(args.method)
    refuse_ignored_flags(method, config)
    return method.from_adapter(start, changed)


def base_model_of(args: argparse.Namespace, method) -> Optional[str]:
    """--model, else the base the --init-adapter records (else None: the default base)."""
    model = dataclass_from_args(ModelArguments, args, adapter=None, device=None).model
    start = getattr(method, "start", None)
    return model or (recorded_base(start.init_adapter) if start and start.init_adapter else None)


def run(args: argparse.Namespace) -> int:
    method = method_of(args)
    model = dataclass_from_args(ModelArguments, args, adapter=None, device=None)
    try:
        fine_tune(method, dataclass_from_args(TrainingArguments, args), dataclass_from_args(DataArguments, args),
                  model_id=base_model_of(args, method), auth_token=model.auth_token, dtype=model.dtype)
    except TrainingInterrupted as exc:
        argv = [a for a in args.argv if a != "--overwrite"]
        exc.args = (f"{exc}\nto continue: {redacted_command(argv + ([] if '--resume' in argv else ['--resume']))}",)
        raise
    return 0
