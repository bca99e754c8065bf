"""``llama-expert mix A B [C ...] --output-dir M``: adapters trained apart become one routed adapter."""

from __future__ import annotations

import argparse

from ..lifecycle.mix import MixArguments, run_mix
from .arguments import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER",
                        help="adapter folders, one skill each: branches and PEFT LoRAs (written by `train`), or mixes")
    add_dataclass_arguments(parser, MixArguments, skip=("adapters",), title="mix")


def run(args: argparse.Namespace) -> int:
    run_mix(dataclass_from_args(MixArguments, args))
    return 0
