"""The training settings, one dataclass: the defaults live here and the CLI flags are generated from it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from ..options import flag_for, option


@dataclass
class TrainingArguments:
    output_dir: str = option("outputs/llama-expert", "where the adapter, checkpoints and logs go")
    num_train_epochs: float = option(1.0, "passes over the training blocks", flag="--epochs")
    max_steps: Optional[int] = option(None, "optimizer steps; overrides --epochs")
    batch_size: int = option(8, "training blocks per device per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", flag="--gradient-accumulation")
    learning_rate: float = option(1e-3, "peak learning rate of AdamW (warm-up, then cosine decay)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.05, "share of the steps spent warming the learning rate up")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seq_len: int = option(512, "tokens per training block (and validation window)")
    max_samples: Optional[int] = option(None, "cap on packed training blocks")
    eval_every: int = option(50, "steps between validations (0: never)")
    eval_max_tokens: Optional[int] = option(16384, "validation tokens evaluated each time")
    save_every: Optional[int] = option(None, "steps between checkpoints (default: --eval-every)")
    mixed_precision: str = option("auto", "autocast: auto (bf16/fp16 on a GPU, none on a CPU), no, bf16, fp16",
                                  choices=("auto", "no", "bf16", "fp16"))
    compile: str = option("none", "compile the training step: adapters (each MoE adapter's forward and backward "
                                  "fused by torch.compile; float-equal, compiles once per expert count) or none",
                          choices=("none", "adapters"))  # training/compilation.py's COMPILATIONS (a test checks)
    seed: int = option(42, "seed of the data order, adapter initialisation and router noise")
    resume: bool = option(False, "continue from OUTPUT_DIR/checkpoints/last (same settings)")
    overwrite: bool = option(False, "replace the training outputs already in OUTPUT_DIR (other files stay)")
    stop_after_steps: Optional[int] = option(None, "end this run after N steps (preemptible jobs; resume later)")
    use_wandb: bool = option(False, "log to Weights & Biases (WANDB_MODE=offline works without an account)")
    wandb_project: str = option("llama-expert", "Weights & Biases project")
    use_tensorboard: bool = option(False, "log to TensorBoard in OUTPUT_DIR/tensorboard")
    progress: bool = option(True, "no progress bar")
    log_every: int = option(1, "steps between records in train_log.jsonl")

    def validate(self) -> None:
        """Fail before any model loads on settings that cannot work (booleans are not numbers here); each
        message names the flag."""
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{flag_for(TrainingArguments, name)} must be {rule}, got {getattr(self, name)!r}.")

        def number(name: str, kinds=(int, float)) -> float:
            value = getattr(self, name)
            need(isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value), name,
                 "an integer" if kinds is int else "a finite number")
            return value

        for name in ("batch_size", "gradient_accumulation_steps", "seq_len", "log_every"):
            need(number(name, int) >= 1, name, ">= 1")
        need(number("learning_rate") > 0, "learning_rate", "> 0")
        need(number("num_train_epochs") > 0, "num_train_epochs", "> 0")
        need(number("weight_decay") >= 0, "weight_decay", ">= 0")
        need(0 <= number("warmup_ratio") < 1, "warmup_ratio", "in [0, 1)")
        need(number("max_grad_norm") > 0, "max_grad_norm", "> 0")
        need(number("eval_every", int) >= 0, "eval_every", ">= 0 (0: never)")
        for name in ("max_steps", "max_samples", "save_every", "stop_after_steps", "eval_max_tokens"):
            need(getattr(self, name) is None or number(name, int) >= 1, name, ">= 1 (or unset)")
        need(self.seq_len >= 2, "seq_len", ">= 2 (a block predicts --seq-len minus 1 tokens)")
        if self.eval_max_tokens is not None and self.eval_max_tokens < self.seq_len:
            raise ConfigError(f"--eval-max-tokens {self.eval_max_tokens} is less than one window of --seq-len "
                              f"{self.seq_len}; raise --eval-max-tokens or lower --seq-len.")
        need(self.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision", "auto, no, bf16 or fp16")
        need(self.compile in ("none", "adapters"), "compile", "none or adapters")


@dataclass
class DataArguments:
    """What the recipe trains, validates and tests on (see ``llama_expert.data.load_text_dataset``)."""

    dataset: Optional[str] = option("embedded", "Hub dataset, local .txt/.jsonl file or folder, or 'embedded' "
                                                "(the offline corpus); several, comma-separated, train as a mixture")
    dataset_weights: Optional[str] = option(None, "with several --dataset sources (a,b,c): tokens of each per "
                                                  "unit of weight, e.g. 1,1,2 (default: equal)")
    dataset_config: Optional[str] = option(None, "Hub dataset config, e.g. wikitext-2-raw-v1")
    eval_dataset: Optional[str] = option(None, "validation text (default: the dataset's validation split)")
    test_dataset: Optional[str] = option(None, "measure test perplexity on this before and after training "
                                               "(several, comma-separated: each, and their mean log-perplexity)")
    test_max_tokens: Optional[int] = option(16384, "test tokens evaluated")
    test_seq_len: Optional[int] = option(None, "window length for the test (default: --seq-len)")

    def validate(self) -> None:
        for name in ("test_max_tokens", "test_seq_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ConfigError(f"{flag_for(DataArguments, name)} must be an integer >= 2 (or unset), got "
                                  f"{value!r}.")
        if self.test_seq_len and self.test_max_tokens and self.test_max_tokens < self.test_seq_len:
            raise ConfigError(f"--test-max-tokens {self.test_max_tokens} is less than one window of --test-seq-len "
                              f"{self.test_seq_len}; raise --test-max-tokens or lower --test-seq-len.")
