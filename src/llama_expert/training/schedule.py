"""How long a run is and which blocks each step sees: pure functions of the settings, hence resumable.

Data order is a pure function of (seed, epoch): step ``s`` always sees the same blocks on the same rank, which
is what makes resuming exact (a checkpoint stores the step, not a data-loader position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .arguments import TrainingArguments


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimiser steps, its warm-up, and how a step is made of blocks."""
    total_steps: int
    warmup_steps: int
    num_blocks: int
    batch_size: int
    accumulation: int
    world: int
    seed: int

    @classmethod
    def plan(cls, args: TrainingArguments, num_blocks: int, world: int) -> "Schedule":
        """``--max-steps``, else ``--epochs`` over the blocks; refuses data that cannot fill one step."""
        micro_per_epoch = num_blocks // (args.batch_size * world)
        if micro_per_epoch < args.gradient_accumulation_steps:
            raise ConfigError(f"{num_blocks} training blocks of {args.seq_len} tokens cannot fill one step of "
                              f"--batch-size {args.batch_size} x --gradient-accumulation "
                              f"{args.gradient_accumulation_steps} x {world} processes; lower --batch-size / "
                              f"--gradient-accumulation or give more data.")
        steps_per_epoch = micro_per_epoch // args.gradient_accumulation_steps
        total = args.max_steps or max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
        return cls(total, int(args.warmup_ratio * total), num_blocks, args.batch_size,
                   args.gradient_accumulation_steps, world, args.seed)

    def rows(self, step: int, micro: int, rank: int) -> torch.Tensor:
        """The training blocks of (step, micro-batch, rank)."""
        return block_rows(step, micro, self.accumulation, self.batch_size, rank, self.world, self.num_blocks,
                          self.seed)

    def learning_rate_factor(self):
        return cosine_with_warmup(self.total_steps, self.warmup_steps)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """The factor on the learning rate at each step: linear warm-up (never zero), then a cosine to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def block_rows(step: int, micro: int, accumulation: int, batch_size: int, rank: int, world: int,
               num_blocks: int, seed: int) -> torch.Tensor:
    """Indices of the training blocks for (step, micro-batch, rank): a pure function, hence resumable."""
    per_epoch = num_blocks // (batch_size * world)
    global_micro = step * accumulation + micro
    epoch, within = divmod(global_micro, per_epoch)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + epoch))
    start = (within * world + rank) * batch_size
    return order[start:start + batch_size]
