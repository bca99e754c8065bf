"""The plain-LoRA baseline: PEFT LoRA on the MLP projections, trained by the same loop on the same data.

``compare`` uses it to answer the one question that matters: do the MoE adapters beat plain LoRA at the
same trainable-parameter budget? ``matched_lora_rank`` picks the LoRA rank whose parameter count is
closest to a given budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .errors import ConfigError
from .models import DEFAULT_MODEL, load_base_model, load_tokenizer

LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("the LoRA baseline needs PEFT: pip install peft") from exc
    return peft


def lora_parameters_per_rank(model, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Trainable parameters one unit of LoRA rank adds: ``in + out`` features per targeted Linear."""
    import torch.nn as nn

    return sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] in targets)


def matched_lora_rank(model, budget: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    per_rank = lora_parameters_per_rank(model, targets)
    if per_rank == 0:
        raise ConfigError(f"the model has no Linear layers named {list(targets)} to put LoRA on.")
    return max(1, round(budget / per_rank))


def add_lora(model, rank: int, alpha: Optional[float] = None, dropout: float = 0.05,
             targets: Sequence[str] = LORA_TARGETS):
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout,
                             target_modules=list(targets), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def save_lora(model, folder) -> None:
    model.save_pretrained(str(folder))


def load_lora_weights(model, folder) -> None:
    """Load a saved LoRA state into a PeftModel built with the same config (used when resuming)."""
    from safetensors.torch import load_file

    _peft().set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))


def load_lora_model(base_model, folder):
    """A base model with the LoRA adapter in ``folder`` (as saved by PEFT), in eval mode."""
    peft = _peft()
    if not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(f"{folder} holds no PEFT adapter_config.json; pass a folder written by "
                          f"`llama-expert train --method lora` or PEFT's save_pretrained.")
    return peft.PeftModel.from_pretrained(base_model, str(folder)).eval()


def fine_tune_lora_model(model_id: Optional[str] = DEFAULT_MODEL, dataset_name: Optional[str] = None,
                         output_dir: str = "outputs/lora", lora_r: int = 8, lora_alpha: Optional[float] = None,
                         lora_dropout: float = 0.05, num_train_epochs: float = 1.0, batch_size: int = 8,
                         dataset_config: Optional[str] = None, eval_dataset: Optional[str] = None,
                         test_dataset: Optional[str] = None, test_max_tokens: Optional[int] = 16384,
                         test_seq_len: Optional[int] = None, auth_token: Optional[str] = None, dtype=None,
                         **training_kwargs):
    """Train a PEFT LoRA adapter with exactly the recipe ``fine_tune_augmented_model`` uses."""
    from accelerate.utils import set_seed

    from .train import RecipeData, _setup, run_recipe

    args, accelerator = _setup(output_dir, num_train_epochs, batch_size, training_kwargs)
    tokenizer = load_tokenizer(model_id, auth_token=auth_token)
    data = RecipeData(tokenizer, dataset_name, dataset_config, eval_dataset, test_dataset, args.seq_len,
                      args.max_samples, args.eval_max_tokens, test_max_tokens, test_seq_len)
    set_seed(args.seed)
    base = load_base_model(model_id, auth_token=auth_token, dtype=dtype)
    base_name = base.name_or_path
    model = add_lora(base, lora_r, lora_alpha, lora_dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if accelerator.is_main_process:
        print(f"LoRA r={lora_r} on {', '.join(LORA_TARGETS)}: {trainable:,} trainable of {total:,} "
              f"({100 * trainable / total:.4f}%)")
    settings = {"model": base_name, "dataset": dataset_name, "dataset_config": dataset_config,
                "eval_dataset": eval_dataset, "test_dataset": test_dataset, "test_max_tokens": test_max_tokens,
                "test_seq_len": test_seq_len, "dtype": str(base.dtype).replace("torch.", ""),
                "lora": {"r": lora_r, "alpha": lora_alpha or 2 * lora_r, "dropout": lora_dropout,
                         "targets": list(LORA_TARGETS)}}
    return run_recipe("lora", model, save_lora, load_lora_weights, None, data, args, accelerator, settings)
