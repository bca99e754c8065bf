"""Hugging Face Accelerate for the training loop: ``accelerate launch`` gives DDP or FSDP with no launcher of ours."""

from __future__ import annotations

from typing import Optional

import torch

from .arguments import TrainingArguments


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: bf16 on a GPU that has it, else fp16 on a GPU, else none (a CPU trains in float32)."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(args: TrainingArguments):
    """Accelerate for this loop. Buffers are not broadcast: each rank keeps its own routing statistics."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision),
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def autocast_dtype(accelerator) -> Optional[torch.dtype]:
    """The dtype Accelerate's mixed precision autocasts to (None: no autocast), for evaluation passes."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
