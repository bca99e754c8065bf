"""``llama-expert distill``: train a dense LoRA that reproduces an MoE-augmented model, for merging."""

from __future__ import annotations

import argparse

from ..lifecycle.distill import DistillArguments, run_distill
from .arguments import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DistillArguments, title="distill")


def run(args: argparse.Namespace) -> int:
    run_distill(dataclass_from_args(DistillArguments, args))
    return 0
