"""``llama-expert prune``: keep each layer's most useful experts, scored on calibration text."""

from __future__ import annotations

import argparse

from ..lifecycle.prune import PruneArguments, run_prune
from .arguments import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, PruneArguments, title="prune")


def run(args: argparse.Namespace) -> int:
    run_prune(dataclass_from_args(PruneArguments, args))
    return 0
