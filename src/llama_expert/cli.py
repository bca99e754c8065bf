"""llama-expert: train, benchmark, compare and run MoE adapters on a frozen Llama-family model.

Each subcommand lives beside the code it drives: the module exposes ``add_cli_arguments(parser)`` and
``run_cli(args)``. Errors a user can act on (LlamaExpertError) print one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from .errors import LlamaExpertError

SUBCOMMANDS = {
    "train": ("train", "fine-tune MoE adapters on a frozen base model"),
    "benchmark": ("benchmark", "measure perplexity, throughput, memory and expert usage"),
    "compare": ("compare", "measure base vs augmented (vs a PEFT LoRA baseline) in one run"),
    "inference": ("generate", "generate text from a prompt or interactively"),
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one subcommand's: running a command imports just its module."""
    parser = argparse.ArgumentParser(prog="llama-expert", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llama-expert {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod = importlib.import_module(f".{module}", __package__)
        mod.add_cli_arguments(sp)
        sp.set_defaults(_run=mod.run_cli)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=os.environ.get("LLAMA_EXPERT_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    except LlamaExpertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
