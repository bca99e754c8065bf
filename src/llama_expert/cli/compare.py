"""``llama-expert compare``: base vs MoE adapters (vs a PEFT LoRA baseline) measured in one run.

The seed's form ``compare --base-model ID --augmented-model FOLDER`` works: ``--base-model`` is an alias
of ``--model`` and ``--augmented-model`` of ``--adapter``.
"""

from __future__ import annotations

import argparse

from ..evaluation.compare import DATA_FIELDS, TRAINING_DEFAULTS, TRAINING_FIELDS, CompareArguments, run_compare
from ..integration.base_models import DEFAULT_MODEL
from ..evaluation.throughput import ThroughputArguments
from ..integration.loading import ModelArguments
from ..training.arguments import DataArguments, TrainingArguments
from .arguments import add_dataclass_arguments, dataclass_from_args, redacted_command




def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ModelArguments, skip=("device",), title="model (the MoE adapter is trained "
                            "here unless --adapter names one; --dtype is the base's dtype while training)",
                            defaults={"model": DEFAULT_MODEL})
    add_dataclass_arguments(parser, CompareArguments, title="comparison")
    add_dataclass_arguments(parser, ThroughputArguments, title="throughput")
    training = parser.add_argument_group("training (both methods, identical)")
    add_dataclass_arguments(training, DataArguments, only=DATA_FIELDS)
    add_dataclass_arguments(training, TrainingArguments, only=TRAINING_FIELDS, defaults=TRAINING_DEFAULTS)


def run(args: argparse.Namespace) -> int:
    run_compare(dataclass_from_args(ModelArguments, args, device=None), dataclass_from_args(CompareArguments, args),
                dataclass_from_args(TrainingArguments, args, only=TRAINING_FIELDS),
                dataclass_from_args(DataArguments, args, only=DATA_FIELDS),
                dataclass_from_args(ThroughputArguments, args), command=redacted_command(args.argv))
    return 0
