"""llama-expert: train, benchmark, compare and run MoE adapters on a frozen Llama-family model.

One module per command (``cli/train.py``, ...): ``add_arguments(parser)`` generates its flags from the
settings dataclasses, and ``run(args)`` makes one library call. Running a command imports only its
module. Errors a user can act on (LlamaExpertError) print one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from ..errors import LlamaExpertError
from .arguments import HelpFormatter

COMMANDS = ("train", "benchmark", "compare", "inference", "serve", "prune", "distill", "export", "mix")
HELPS = {
    "train": "fine-tune MoE adapters on a frozen base model",
    "benchmark": "measure perplexity, throughput, memory and expert usage",
    "compare": "measure base vs augmented (vs a PEFT LoRA baseline) in one run",
    "inference": "generate text from a prompt or interactively",
    "serve": "an OpenAI-compatible HTTP server (completions, chat, streaming) over a base or augmented model",
    "prune": "keep each layer's most useful experts (scored on calibration text) in a smaller adapter",
    "distill": "train a dense LoRA to reproduce an MoE-augmented model (so that it can be merged)",
    "export": "fold a dense LoRA into the base and write a Transformers folder or a GGUF file",
    "mix": "make branch adapters trained apart (one skill each) the experts of one adapter, routed by prototype",
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one command's: running a command imports just its module."""
    # No abbreviated flags: `--auth` for `--auth-token` would slip past the redaction of recorded commands.
    parser = argparse.ArgumentParser(prog="llama-expert", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"llama-expert {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=HELPS[name])
            continue
        module = importlib.import_module(f".{name}", __name__)
        command = sub.add_parser(name, help=HELPS[name], description=HELPS[name], formatter_class=HelpFormatter,
                                 allow_abbrev=False)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=os.environ.get("LLAMA_EXPERT_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else "")
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for messages that print a command to rerun
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    except LlamaExpertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
