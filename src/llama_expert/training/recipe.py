"""The training recipe: load a base, add a method's adapters, train them, leave them with their measurements.

``fine_tune`` drives any registered ``TrainingMethod``; ``fine_tune_augmented_model`` (MoE adapters, the
``train`` command) and ``fine_tune_lora_model`` (the PEFT LoRA baseline) are that recipe with one method
each. It writes to ``output_dir``: the adapter, ``checkpoints/last`` and ``checkpoints/best``,
``train_log.jsonl``, the method's own measurements (MoE: ``expert_usage.json`` + ``.png``) and
``training_summary.json``. Run it under ``accelerate launch`` for several GPUs.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ..config import ExpertConfig
from ..data import EMBEDDED_DATASET, load_split, load_text_dataset, pack_blocks, select_split, tokenize_documents
from ..evaluation.perplexity import evaluate_perplexity
from ..files import atomic_write_text
from ..integration.base_models import (DEFAULT_MODEL, check_within_context, load_base_config, load_base_model,
                                       load_tokenizer)
from .arguments import DataArguments, TrainingArguments
from .loop import TrainResult, make_accelerator, train_model
from .methods import LoRAMethod, MoEMethod, TrainingMethod
from .run_folder import RunLock, check_output_folder, clear_run_outputs

USAGE_TOKENS = 8192  # held-out tokens routed to measure expert usage after training


class RecipeData:
    """Training blocks, validation windows and optional test windows, all from one tokenizer."""

    def __init__(self, tokenizer, data: DataArguments, seq_len: int, max_samples: Optional[int],
                 eval_max_tokens: Optional[int], progress: bool = True):
        def tokens(docs):
            return tokenize_documents(docs, tokenizer, progress=progress)

        # Validation never overlaps training: without --eval-dataset, a single file's last 5% is held out of
        # training (load_text_dataset); with one, the whole training file trains.
        if data.eval_dataset:
            train_docs = load_split(data.dataset, data.dataset_config, tokenizer, "train")
            eval_docs = load_split(data.eval_dataset, data.dataset_config, tokenizer, "validation")
        else:
            splits = load_text_dataset(data.dataset, data.dataset_config, tokenizer)
            source = data.dataset or EMBEDDED_DATASET
            train_docs = select_split(splits, "train", source)
            eval_docs = select_split(splits, "validation", source)
        self.train = pack_blocks(tokens(train_docs), seq_len, max_blocks=max_samples)
        self.eval = pack_blocks(tokens(eval_docs), seq_len, max_tokens=eval_max_tokens)
        self.test = None
        if data.test_dataset:
            test_docs = load_split(data.test_dataset, None, tokenizer, "test")
            self.test = pack_blocks(tokens(test_docs), data.test_seq_len or seq_len,
                                    max_tokens=data.test_max_tokens)


def fine_tune(method: TrainingMethod, args: TrainingArguments, data_args: Optional[DataArguments] = None,
              model_id: Optional[str] = DEFAULT_MODEL, auth_token: Optional[str] = None, dtype=None) -> TrainResult:
    """Train ``method``'s adapters on a frozen ``model_id``: test before, train, test after, write the summary.

    Everything that can be checked before the model loads is: the settings, the output folder (never
    clobbered: ``resume`` continues it, ``overwrite`` replaces only its training outputs), the lock that
    keeps a second run out of it, and the sequence lengths against the model's context.
    """
    data_args = data_args or DataArguments()
    args.validate()
    data_args.validate()
    method.check()
    output_dir = Path(args.output_dir)
    check_output_folder(output_dir, args.resume, args.overwrite)
    accelerator = make_accelerator(args)
    with RunLock(output_dir) if accelerator.is_main_process else nullcontext():
        if args.overwrite and accelerator.is_main_process:
            removed = clear_run_outputs(output_dir)
            if removed:
                print(f"--overwrite: removed {', '.join(removed)} from {output_dir}")
        accelerator.wait_for_everyone()
        return _fine_tune(method, args, data_args, model_id, auth_token, dtype, accelerator)


def _check_context(model_id, auth_token, args: TrainingArguments, data_args: DataArguments) -> None:
    config = load_base_config(model_id, auth_token=auth_token)
    check_within_context(config, args.seq_len, "--seq-len")
    check_within_context(config, data_args.test_seq_len, "--test-seq-len")


def _fine_tune(method: TrainingMethod, args: TrainingArguments, data_args: DataArguments, model_id, auth_token,
               dtype, accelerator) -> TrainResult:
    from accelerate.utils import set_seed

    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    tokenizer = load_tokenizer(model_id, auth_token=auth_token)
    _check_context(model_id, auth_token, args, data_args)
    progress = args.progress and main
    data = RecipeData(tokenizer, data_args, args.seq_len, args.max_samples, args.eval_max_tokens, progress)
    set_seed(args.seed)  # identical adapter initialisation on every rank
    base = load_base_model(model_id, auth_token=auth_token, dtype=dtype, quantization_4bit=method.quantization_4bit)
    base_name = base.name_or_path
    settings = {"model": base_name, **asdict(data_args), "dtype": str(base.dtype).replace("torch.", ""),
                **method.settings()}
    model = method.add_to(base)
    say(method.describe(model))
    say(f"data: {data.train.shape[0]} training blocks x {args.seq_len} tokens ({data.train.numel():,} tokens), "
        f"validation {data.eval.numel():,} tokens")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    model.to(accelerator.device)
    test_before = evaluate_perplexity(model, data.test, autocast_dtype=autocast, progress=progress) \
        if data.test is not None and main and not args.resume else None
    result = train_model(model, data.train, data.eval, args,
                         save_model=lambda m, folder: method.save(m, folder, base_name), load_model=method.load,
                         extra_loss=method.extra_loss, run_config={"method": method.name, **settings, **asdict(args)},
                         accelerator=accelerator)
    if not main:
        return result
    output_dir = Path(args.output_dir)
    method.after_training(model, data.eval[: max(1, USAGE_TOKENS // args.seq_len)], output_dir, result.steps,
                          progress=progress)
    summary = {"method": method.name, "settings": settings, "training_arguments": asdict(args), "steps": result.steps,
               "tokens": result.tokens, "seconds": result.seconds, "peak_memory": result.peak_memory,
               "initial_validation": result.initial_eval, "final_validation": result.final_eval,
               "best_validation": result.best_eval, "stopped_early": result.stopped_early,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    say("")
    say(result.summary())
    if data.test is not None:
        test_after = evaluate_perplexity(model, data.test, autocast_dtype=autocast, progress=progress)
        result.test = summary["test"] = {"dataset": data_args.test_dataset, "before": test_before,
                                         "after": test_after}
        if test_before:
            change = 100 * (test_after["perplexity"] - test_before["perplexity"]) / test_before["perplexity"]
            say(f"test perplexity {test_before['perplexity']:.3f} -> {test_after['perplexity']:.3f} ({change:+.1f}%) "
                f"on {test_after['tokens']:,} tokens in {test_after['windows']} windows of {test_after['seq_len']}")
        else:
            say(f"test perplexity {test_after['perplexity']:.3f} on {test_after['tokens']:,} tokens")
    atomic_write_text(output_dir / "training_summary.json", json.dumps(summary, indent=1) + "\n")
    return result


def _split_kwargs(output_dir, num_train_epochs, batch_size, dataset_name, dataset_config, eval_dataset, test_dataset,
                  test_max_tokens, test_seq_len, training_kwargs):
    args = TrainingArguments(output_dir=output_dir, num_train_epochs=num_train_epochs, batch_size=batch_size,
                             **training_kwargs)
    data = DataArguments(dataset=dataset_name, dataset_config=dataset_config, eval_dataset=eval_dataset,
                         test_dataset=test_dataset, test_max_tokens=test_max_tokens, test_seq_len=test_seq_len)
    return args, data


def fine_tune_augmented_model(model_id: Optional[str] = DEFAULT_MODEL, dataset_name: Optional[str] = EMBEDDED_DATASET,
                              output_dir: str = "outputs/llama-expert", config: Optional[ExpertConfig] = None,
                              num_train_epochs: float = 1.0, batch_size: int = 8,
                              dataset_config: Optional[str] = None, eval_dataset: Optional[str] = None,
                              test_dataset: Optional[str] = None, test_max_tokens: Optional[int] = 16384,
                              test_seq_len: Optional[int] = None, auth_token: Optional[str] = None,
                              dtype=None, **training_kwargs) -> TrainResult:
    """Fine-tune MoE adapters on ``dataset_name`` and save them in ``output_dir`` (the seed's signature).

    ``eval_dataset``: the periodic validation text (default: the dataset's validation split, or the last
    5% of a single file). ``test_dataset``: measured before and after training with the perplexity
    protocol (windows of ``test_seq_len``, the first ``test_max_tokens`` tokens).
    Other keyword arguments are fields of ``TrainingArguments``.
    """
    args, data = _split_kwargs(output_dir, num_train_epochs, batch_size, dataset_name, dataset_config, eval_dataset,
                               test_dataset, test_max_tokens, test_seq_len, training_kwargs)
    return fine_tune(MoEMethod(config), args, data, model_id=model_id, auth_token=auth_token, dtype=dtype)


def fine_tune_lora_model(model_id: Optional[str] = DEFAULT_MODEL, dataset_name: Optional[str] = EMBEDDED_DATASET,
                         output_dir: str = "outputs/lora", lora_r: int = 8, lora_alpha: Optional[float] = None,
                         lora_dropout: float = 0.05, num_train_epochs: float = 1.0, batch_size: int = 8,
                         dataset_config: Optional[str] = None, eval_dataset: Optional[str] = None,
                         test_dataset: Optional[str] = None, test_max_tokens: Optional[int] = 16384,
                         test_seq_len: Optional[int] = None, auth_token: Optional[str] = None, dtype=None,
                         **training_kwargs) -> TrainResult:
    """Train a PEFT LoRA adapter with exactly the recipe ``fine_tune_augmented_model`` uses."""
    args, data = _split_kwargs(output_dir, num_train_epochs, batch_size, dataset_name, dataset_config, eval_dataset,
                               test_dataset, test_max_tokens, test_seq_len, training_kwargs)
    return fine_tune(LoRAMethod(lora_r, lora_alpha, lora_dropout), args, data, model_id=model_id,
                     auth_token=auth_token, dtype=dtype)
