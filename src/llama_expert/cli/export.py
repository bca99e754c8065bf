"""``llama-expert export --merge``: a dense LoRA folded into the base, written as a Transformers folder or GGUF."""

from __future__ import annotations

import argparse

from ..lifecycle.export import ExportArguments, run_export
from .arguments import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ExportArguments, title="export")


def run(args: argparse.Namespace) -> int:
    run_export(dataclass_from_args(ExportArguments, args))
    return 0
