"""compare's training runs, each in a child process of its own: the MoE adapters and the LoRA baseline.

One process per run, so that each run's peak memory is its own (the report compares them) and no run leaves
state behind for the measurements. The child makes the library call ``llama-expert train`` makes
(``training.recipe.fine_tune``) with the same settings objects. It is started with multiprocessing's ``spawn``
method (a fresh interpreter: no forked threads, no inherited CUDA state); the settings, an access token
included, travel through multiprocessing's pipe, never on a command line.
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Optional

from ..errors import ConfigError, LlamaExpertError
from ..training.arguments import DataArguments, TrainingArguments
from ..training.recipe import fine_tune


def train_in_child(method, training: TrainingArguments, data: DataArguments, model_id: str,
                   auth_token: Optional[str], dtype: Optional[str]) -> None:
    """Train ``method`` in a spawned child and wait for it; a failed child is one line naming the method."""
    child = multiprocessing.get_context("spawn").Process(
        target=run_child, name=f"llama-expert-train-{method.name}",
        kwargs=dict(method=method, training=training, data=data, model_id=model_id, auth_token=auth_token,
                    dtype=dtype))
    child.start()
    try:
        child.join()
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it finish its step and save a checkpoint
        child.join()
        raise
    if child.exitcode != 0:
        raise ConfigError(f"training the {method.name} adapter failed (exit {child.exitcode}); see the output above.")


def run_child(method, training: TrainingArguments, data: DataArguments, model_id: str, auth_token: Optional[str],
              dtype: Optional[str]) -> None:
    """The child's work: one ``fine_tune``. A user error is one ``error:`` line on stderr, as the CLI prints it."""
    try:
        fine_tune(method, training, data, model_id=model_id, auth_token=auth_token, dtype=dtype)
    except LlamaExpertError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        sys.exit(130)
