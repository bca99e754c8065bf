"""Where training records go: JSON lines always; TensorBoard and Weights & Biases when asked."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ConfigError
from .arguments import TrainingArguments


def strict_json(record: dict) -> dict:
    """JSON has no NaN or Infinity: a non-finite number is logged as null (the run stops on one anyway)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class TrainingLoggers:
    """JSON lines always; TensorBoard and W&B when asked. Only the main process writes."""

    def __init__(self, args: TrainingArguments, enabled: bool, run_config: dict):
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "train_log.jsonl", "a", encoding="utf-8")
        if args.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("--use-tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self.tensorboard = SummaryWriter(log_dir=str(out / "tensorboard"))
        if args.use_wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ConfigError("--use-wandb needs the wandb package: pip install wandb "
                                  "(set WANDB_MODE=offline to log without an account)") from exc
            self.wandb = wandb.init(project=args.wandb_project, config=run_config, dir=str(out))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self.jsonl.flush()
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for k, v in numbers.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
