"""``llama-expert compare``: base vs MoE adapters (vs a PEFT LoRA baseline) measured in one run.

The seed's form ``compare --base-model ID --augmented-model FOLDER`` works: ``--base-model`` is an alias
of ``--model`` and ``--augmented-model`` of ``--adapter``. ``--moe-args '--lora-r 32 --router-type soft'`` sets
the MoE run's ``ExpertConfig`` with ``train``'s own flags.
"""

from __future__ import annotations

import argparse
import shlex

from ..comparison.compare import DATA_FIELDS, TRAINING_DEFAULTS, TRAINING_FIELDS, CompareArguments, run_compare
from ..config import ExpertConfig
from ..errors import ConfigError
from ..evaluation.throughput import ThroughputArguments
from ..integration.base_models import DEFAULT_MODEL
from ..integration.loading import ModelArguments
from ..training.arguments import DataArguments, TrainingArguments
from .arguments import add_dataclass_arguments, dataclass_from_args, redacted_command, strategy_choices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ModelArguments, skip=("device",), title="model (the MoE adapter is trained "
                            "here unless --adapter names one; --dtype is the base's dtype while training)",
                            defaults={"model": DEFAULT_MODEL})
    group = add_dataclass_arguments(parser, CompareArguments, title="comparison")
    group.add_argument("--moe-args", default=None, metavar="FLAGS",
                       help="`train` flags for the MoE run's experts, e.g. '--lora-r 32 --router-type soft'")
    add_dataclass_arguments(parser, ThroughputArguments, title="throughput")
    training = parser.add_argument_group("training (both methods, identical)")
    add_dataclass_arguments(training, DataArguments, only=DATA_FIELDS)
    add_dataclass_arguments(training, TrainingArguments, only=TRAINING_FIELDS, defaults=TRAINING_DEFAULTS)


class _FlagsParser(argparse.ArgumentParser):
    """argparse prints the usage and exits on a bad flag; a bad flag inside ``--moe-args`` is one error line."""

    def error(self, message: str):
        raise ConfigError(message)


def moe_config(flags: str) -> ExpertConfig:
    """The ``ExpertConfig`` that ``train`` would build from ``flags`` (its experts' flags, with its choices)."""
    parser = _FlagsParser(prog="llama-expert compare --moe-args", add_help=False, allow_abbrev=False)
    add_dataclass_arguments(parser, ExpertConfig, choices=strategy_choices())
    try:
        parsed = parser.parse_args(shlex.split(flags))
    except (ConfigError, ValueError) as exc:  # ValueError: shlex, an unclosed quote
        raise ConfigError(f"--moe-args {flags!r}: {exc}; it takes `train`'s expert flags, e.g. '--lora-r 32'.") \
            from None
    return dataclass_from_args(ExpertConfig, parsed)


def run(args: argparse.Namespace) -> int:
    run_compare(dataclass_from_args(ModelArguments, args, device=None), dataclass_from_args(CompareArguments, args),
                dataclass_from_args(TrainingArguments, args, only=TRAINING_FIELDS),
                dataclass_from_args(DataArguments, args, only=DATA_FIELDS),
                dataclass_from_args(ThroughputArguments, args), command=redacted_command(args.argv),
                moe_config=moe_config(args.moe_args) if args.moe_args else None)
    return 0
