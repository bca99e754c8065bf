"""``llama-expert inference``: one reply to ``--prompt``, or an interactive chat that streams tokens."""

from __future__ import annotations

import argparse

from ..inference.chat import GenerationArguments, run_inference
from ..integration.loading import ModelArguments
from .arguments import add_dataclass_arguments, dataclass_from_args




def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ModelArguments, title="model")
    add_dataclass_arguments(parser, GenerationArguments, title="generation")


def run(args: argparse.Namespace) -> int:
    return run_inference(dataclass_from_args(ModelArguments, args), dataclass_from_args(GenerationArguments, args))
