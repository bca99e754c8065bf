"""``llama-expert train``: fine-tune MoE adapters (or, ``--method lora``, the PEFT LoRA baseline)."""

from __future__ import annotations

import argparse

from ..config import ExpertConfig
from ..integration.loading import ModelArguments
from ..training.arguments import DataArguments, TrainingArguments
from ..training.methods import METHODS
from ..training.trainer import TrainingInterrupted
from ..training.recipe import fine_tune
from .arguments import add_dataclass_arguments, dataclass_from_args, redacted_command




def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ModelArguments, skip=("adapter", "device"), title="model")
    add_dataclass_arguments(parser, DataArguments, title="data")
    group = parser.add_argument_group("experts")
    group.add_argument("--method", default="moe", choices=METHODS.names(),
                       help="moe: MoE adapters; lora: the plain PEFT LoRA baseline (rank --lora-r on the MLP)")
    add_dataclass_arguments(group, ExpertConfig)
    add_dataclass_arguments(parser, TrainingArguments, title="training")


def run(args: argparse.Namespace) -> int:
    method = METHODS.get(args.method).from_expert_config(dataclass_from_args(ExpertConfig, args))
    model = dataclass_from_args(ModelArguments, args, adapter=None, device=None)
    try:
        fine_tune(method, dataclass_from_args(TrainingArguments, args), dataclass_from_args(DataArguments, args),
                  model_id=model.model, auth_token=model.auth_token, dtype=model.dtype)
    except TrainingInterrupted as exc:
        argv = [a for a in args.argv if a != "--overwrite"]
        exc.args = (f"{exc}\nto continue: {redacted_command(argv + ([] if '--resume' in argv else ['--resume']))}",)
        raise
    return 0
