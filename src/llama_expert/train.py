"""The training recipe: load a base, augment it, train the adapters, leave them with their measurements.

``fine_tune_augmented_model`` is the ``train`` command as a function. It writes to ``output_dir``: the
adapter (``adapter_config.json`` + ``adapter_model.safetensors``), ``checkpoints/last`` and
``checkpoints/best``, ``train_log.jsonl``, ``expert_usage.json`` + ``expert_usage.png`` and
``training_summary.json``. Run it under ``accelerate launch`` for several GPUs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .adapter_files import load_adapter_weights, save_adapter
from .config import ExpertConfig
from .data import (EMBEDDED_DATASET, load_split, load_text_dataset, pack_blocks, select_split,
                   tokenize_documents)
from .models import DEFAULT_MODEL, load_base_model, load_tokenizer
from .perplexity import evaluate_perplexity
from .surgery import augment_model, parameter_report, router_losses
from .trainer import TrainingArguments, TrainResult, train_model
from .usage import measure_expert_usage, save_usage_heatmap


def router_loss_terms(model):
    """What the router adds to the LM loss, and the raw losses to log (aux is 1 when balanced)."""
    config: ExpertConfig = model.expert_config
    losses = router_losses(model)
    added = config.router_aux_loss_coef * losses["aux_loss"] + config.router_z_loss_coef * losses["z_loss"]
    return added, losses


class RecipeData:
    """Training blocks, validation windows and optional test windows, all from one tokenizer."""

    def __init__(self, tokenizer, dataset_name, dataset_config, eval_dataset, test_dataset, seq_len, max_samples,
                 eval_max_tokens, test_max_tokens, test_seq_len):
        train_docs = load_split(dataset_name, dataset_config, tokenizer, "train")
        if eval_dataset:
            eval_docs = load_split(eval_dataset, dataset_config, tokenizer, "validation")
        else:
            eval_docs = select_split(load_text_dataset(dataset_name, dataset_config, tokenizer), "validation",
                                     dataset_name or EMBEDDED_DATASET)
        self.train = pack_blocks(tokenize_documents(train_docs, tokenizer), seq_len, max_blocks=max_samples)
        self.eval = pack_blocks(tokenize_documents(eval_docs, tokenizer), seq_len, max_tokens=eval_max_tokens)
        self.test = None
        if test_dataset:
            test_docs = load_split(test_dataset, None, tokenizer, "test")
            self.test = pack_blocks(tokenize_documents(test_docs, tokenizer), test_seq_len or seq_len,
                                    max_tokens=test_max_tokens)


def run_recipe(method: str, model, save, load, extra_loss, data: RecipeData, args: TrainingArguments, accelerator,
               settings: dict, after_training=None) -> TrainResult:
    """Shared by the MoE and LoRA recipes: test before, train, test after, write the summary."""
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    say(f"data: {data.train.shape[0]} training blocks x {args.seq_len} tokens ({data.train.numel():,} tokens), "
        f"validation {data.eval.numel():,} tokens")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    model.to(accelerator.device)
    test_before = evaluate_perplexity(model, data.test, autocast_dtype=autocast) \
        if data.test is not None and main and not args.resume else None
    run_config = {"method": method, **settings, **asdict(args)}
    result = train_model(model, data.train, data.eval, args, save_model=save, load_model=load,
                         extra_loss=extra_loss, run_config=run_config, accelerator=accelerator)
    if not main:
        return result
    if after_training is not None:
        after_training(model, result)
    summary = {"method": method, "settings": settings, "training_arguments": asdict(args), "steps": result.steps,
               "tokens": result.tokens, "seconds": result.seconds, "peak_memory": result.peak_memory,
               "initial_validation": result.initial_eval, "final_validation": result.final_eval,
               "best_validation": result.best_eval, "stopped_early": result.stopped_early,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    say("")
    say(result.summary())
    if data.test is not None:
        test_after = evaluate_perplexity(model, data.test, autocast_dtype=autocast)
        result.test = summary["test"] = {"dataset": settings.get("test_dataset"), "before": test_before,
                                         "after": test_after}
        if test_before:
            change = 100 * (test_after["perplexity"] - test_before["perplexity"]) / test_before["perplexity"]
            say(f"test perplexity {test_before['perplexity']:.3f} -> {test_after['perplexity']:.3f} ({change:+.1f}%) "
                f"on {test_after['tokens']:,} tokens in {test_after['windows']} windows of {test_after['seq_len']}")
        else:
            say(f"test perplexity {test_after['perplexity']:.3f} on {test_after['tokens']:,} tokens")
    (Path(args.output_dir) / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return result


def _setup(output_dir, num_train_epochs, batch_size, training_kwargs):
    from .trainer import make_accelerator

    args = TrainingArguments(output_dir=output_dir, num_train_epochs=num_train_epochs, batch_size=batch_size,
                             **training_kwargs)
    args.validate()
    return args, make_accelerator(args)


def fine_tune_augmented_model(model_id: Optional[str] = DEFAULT_MODEL, dataset_name: Optional[str] = EMBEDDED_DATASET,
                              output_dir: str = "outputs/llama-expert", config: Optional[ExpertConfig] = None,
                              num_train_epochs: float = 1.0, batch_size: int = 8,
                              dataset_config: Optional[str] = None, eval_dataset: Optional[str] = None,
                              test_dataset: Optional[str] = None, test_max_tokens: Optional[int] = 16384,
                              test_seq_len: Optional[int] = None, auth_token: Optional[str] = None,
                              dtype=None, **training_kwargs) -> TrainResult:
    """Fine-tune MoE adapters on ``dataset_name`` and save them in ``output_dir``.

    ``eval_dataset``: the periodic validation text (default: the dataset's validation split, or the last
    5% of a single file). ``test_dataset``: measured before and after training with the perplexity
    protocol (windows of ``test_seq_len``, the first ``test_max_tokens`` tokens).
    Other keyword arguments are fields of ``TrainingArguments``.
    """
    from accelerate.utils import set_seed

    args, accelerator = _setup(output_dir, num_train_epochs, batch_size, training_kwargs)
    config = config or ExpertConfig()
    tokenizer = load_tokenizer(model_id, auth_token=auth_token)
    data = RecipeData(tokenizer, dataset_name, dataset_config, eval_dataset, test_dataset, args.seq_len,
                      args.max_samples, args.eval_max_tokens, test_max_tokens, test_seq_len)
    set_seed(args.seed)  # identical adapter initialisation on every rank
    model = load_base_model(model_id, auth_token=auth_token, dtype=dtype, quantization_4bit=config.quantization_4bit)
    base_name = model.name_or_path
    augment_model(model, config)
    if accelerator.is_main_process:
        print(parameter_report(model))

    def save(m, folder):
        save_adapter(m, folder, base_model_name_or_path=base_name)

    def record_usage(m, result):
        out = Path(args.output_dir)
        usage = measure_expert_usage(m, data.eval[: max(1, 8192 // args.seq_len)])
        (out / "expert_usage.json").write_text(json.dumps(usage, indent=1) + "\n")
        try:
            save_usage_heatmap(usage, out / "expert_usage.png", title=f"Expert usage after {result.steps} steps")
        except ImportError:
            print("matplotlib is not installed: skipped expert_usage.png (pip install matplotlib)")

    settings = {"model": base_name, "dataset": dataset_name, "dataset_config": dataset_config,
                "eval_dataset": eval_dataset, "test_dataset": test_dataset, "test_max_tokens": test_max_tokens,
                "test_seq_len": test_seq_len, "dtype": str(model.dtype).replace("torch.", ""),
                "expert_config": config.to_dict()}
    return run_recipe("moe", model, save, load_adapter_weights, router_loss_terms, data, args, accelerator, settings,
                      after_training=record_usage)


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainingArguments()
    c = ExpertConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local folder, .gguf file, or smollm2-135m")
    g.add_argument("--auth-token", default=None, help="Hugging Face token (else HF_TOKEN or the stored login)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    g.add_argument("--dataset", default=EMBEDDED_DATASET,
                   help="Hub dataset, local .txt/.jsonl file or folder, or 'embedded' (offline corpus)")
    g.add_argument("--dataset-config", default=None, help="Hub dataset config, e.g. wikitext-2-raw-v1")
    g.add_argument("--eval-dataset", default=None, help="validation text (default: the dataset's validation split)")
    g.add_argument("--test-dataset", default=None, help="measure test perplexity on this before and after training")
    g.add_argument("--test-max-tokens", type=int, default=16384)
    g.add_argument("--test-seq-len", type=int, default=None, help="window length for the test (default --seq-len)")
    g.add_argument("--max-samples", type=int, default=None, help="cap on packed training blocks")
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g = p.add_argument_group("experts")
    g.add_argument("--method", default="moe", choices=["moe", "lora"],
                   help="moe: MoE adapters; lora: the plain PEFT LoRA baseline (rank --lora-r on the MLP)")
    g.add_argument("--num-experts", type=int, default=c.num_experts)
    g.add_argument("--top-k", type=int, default=c.top_k)
    g.add_argument("--lora-r", type=int, default=c.lora_r)
    g.add_argument("--lora-alpha", type=float, default=c.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=c.lora_dropout)
    g.add_argument("--expert-hidden-size", type=int, default=None)
    g.add_argument("--expert-type", default=c.expert_type, choices=["shared_core", "shared_down"])
    g.add_argument("--expert-allocation", default="progressive",
                   help="progressive, uniform, or a comma-separated count per layer")
    g.add_argument("--router-aux-loss-coef", type=float, default=c.router_aux_loss_coef)
    g.add_argument("--router-z-loss-coef", type=float, default=c.router_z_loss_coef)
    g.add_argument("--no-router-noise", action="store_true")
    g.add_argument("--quantization-4bit", action="store_true", help="load the base in 4 bit (CUDA + bitsandbytes)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--epochs", type=float, default=d.num_train_epochs)
    g.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--gradient-accumulation", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--learning-rate", type=float, default=d.learning_rate)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations (0: never)")
    g.add_argument("--eval-max-tokens", type=int, default=d.eval_max_tokens)
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default --eval-every)")
    g.add_argument("--mixed-precision", default=d.mixed_precision, choices=["auto", "no", "bf16", "fp16"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last")
    g.add_argument("--stop-after-steps", type=int, default=None, help="end this run after N steps (resume later)")
    g.add_argument("--use-wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--use-tensorboard", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _allocation(text: str):
    if text in ("progressive", "uniform"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(f"--expert-allocation {text!r}: use progressive, uniform or counts like 4,6,8,6") from None


def config_from_args(a) -> ExpertConfig:
    return ExpertConfig(num_experts=a.num_experts, top_k=a.top_k, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                        lora_dropout=a.lora_dropout, expert_hidden_size=a.expert_hidden_size,
                        expert_type=a.expert_type, expert_allocation=_allocation(a.expert_allocation),
                        router_aux_loss_coef=a.router_aux_loss_coef, router_z_loss_coef=a.router_z_loss_coef,
                        router_noise=not a.no_router_noise, quantization_4bit=a.quantization_4bit,
                        use_gradient_checkpointing=a.gradient_checkpointing)


def run_cli(a) -> int:
    if a.method == "lora":
        from .lora_baseline import fine_tune_lora_model

        recipe, specific = fine_tune_lora_model, {"lora_r": a.lora_r, "lora_alpha": a.lora_alpha,
                                                  "lora_dropout": a.lora_dropout}
    else:
        recipe, specific = fine_tune_augmented_model, {"config": config_from_args(a)}
    recipe(
        **specific, model_id=a.model, dataset_name=a.dataset, dataset_config=a.dataset_config,
        eval_dataset=a.eval_dataset, test_dataset=a.test_dataset, test_max_tokens=a.test_max_tokens,
        test_seq_len=a.test_seq_len, output_dir=a.output_dir, num_train_epochs=a.epochs, batch_size=a.batch_size,
        auth_token=a.auth_token, dtype=a.dtype, max_steps=a.max_steps,
        gradient_accumulation_steps=a.gradient_accumulation, learning_rate=a.learning_rate,
        weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio, max_grad_norm=a.max_grad_norm,
        seq_len=a.seq_len, max_samples=a.max_samples, eval_every=a.eval_every, eval_max_tokens=a.eval_max_tokens,
        save_every=a.save_every, mixed_precision=a.mixed_precision, seed=a.seed, resume=a.resume,
        stop_after_steps=a.stop_after_steps, use_wandb=a.use_wandb, use_tensorboard=a.use_tensorboard,
        progress=not a.no_progress)
    return 0
