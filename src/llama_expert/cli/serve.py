"""``llama-expert serve``: an OpenAI-compatible HTTP server over a base or MoE-augmented model."""

from __future__ import annotations

import argparse

from ..inference.server import ServeArguments, run_server
from ..integration.loading import ModelArguments
from .arguments import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ModelArguments, title="model")
    add_dataclass_arguments(parser, ServeArguments, title="server")


def run(args: argparse.Namespace) -> int:
    run_server(dataclass_from_args(ModelArguments, args), dataclass_from_args(ServeArguments, args))
    return 0
