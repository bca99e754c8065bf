"""``llama-expert train``: fine-tune MoE adapters (or, ``--method lora``, the PEFT LoRA baseline)."""

from __future__ import annotations

import argparse

from ..config import ExpertConfig
from ..errors import ConfigError
from ..integration.loading import ModelArguments
from ..training.arguments import DataArguments, TrainingArguments
from ..training.methods import METHODS, AdapterStart, MoEMethod
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


def changed_expert_flags(config: ExpertConfig) -> list:
    default = ExpertConfig()
    return [flag_for(ExpertConfig, f) for f in ExpertConfig.__dataclass_fields__
            if getattr(config, f) != getattr(default, f)]


def method_of(args: argparse.Namespace):
    """The training method the flags ask for: fresh adapters of --method, or the --init-adapter's (whose settings
    the expert flags may not contradict)."""
    config, start = dataclass_from_args(ExpertConfig, args), dataclass_from_args(AdapterStart, args)
    if start.init_adapter is None:
        start.check()
        refuse_ignored_flags(METHODS.get(args.method), config)
        return METHODS.get(args.method).from_expert_config(config)
    if args.method != "moe":
        raise ConfigError(f"--init-adapter continues an MoE adapter; drop --method {args.method}.")
    changed = changed_expert_flags(config)
    if changed:
        raise ConfigError(f"--init-adapter {start.init_adapter} brings its own expert settings; drop "
                          f"{', '.join(changed)}.")
    return MoEMethod.from_adapter(start)


def run(args: argparse.Namespace) -> int:
    method = method_of(args)
    model = dataclass_from_args(ModelArguments, args, adapter=None, device=None)
    try:
        fine_tune(method, dataclass_from_args(TrainingArguments, args), dataclass_from_args(DataArguments, args),
                  model_id=model.model, auth_token=model.auth_token, dtype=model.dtype)
    except TrainingInterrupted as exc:
        argv = [a for a in args.argv if a != "--overwrite"]
        exc.args = (f"{exc}\nto continue: {redacted_command(argv + ([] if '--resume' in argv else ['--resume']))}",)
        raise
    return 0
