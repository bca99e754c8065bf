"""The training recipe: load a base, add a method's adapters, train them, leave them with their measurements.

``fine_tune`` drives any registered ``TrainingMethod``; ``fine_tune_augmented_model`` (MoE adapters, the
``train`` command) and ``fine_tune_lora_model`` (the PEFT LoRA baseline) are that recipe with one method
each. It writes to ``output_dir``: the adapter, ``checkpoints/last`` and ``checkpoints/best``,
``train_log.jsonl``, the method's own measurements (MoE: ``expert_usage.json`` + ``.png``), the prototypes
(``prototypes.safetensors``: what a later mix routes by, ``integration/prototypes.py``) and
``training_summary.json``. Run it under ``accelerate launch`` for several GPUs.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch

from ..config import ExpertConfig
from ..data import (EMBEDDED_DATASET, domain_name, load_split, load_text_dataset, mix_blocks, pack_blocks,
                    parse_weights, select_split, split_sources, tokenize_documents)
from ..errors import ConfigError, DataError
from ..metrics.perplexity import evaluate_perplexity
from ..files import atomic_write_text, relation
from ..integration.base_models import (DEFAULT_MODEL, check_within_context, load_base_config, load_base_model,
                                       load_tokenizer)
from ..integration.prototypes import measure_prototypes, save_prototypes
from .arguments import DataArguments, TrainingArguments
from .accelerator import autocast_dtype, make_accelerator
from .trainer import TrainResult, train_model
from .methods import LoRAMethod, MoEMethod, TrainingMethod
from .checkpoints import require_checkpoint
from .run_folder import RunLock, check_output_folder, clear_run_outputs

USAGE_TOKENS = 8192  # held-out tokens routed to measure expert usage after training
PROTOTYPE_TOKENS = 8192  # training tokens the prototypes are measured on (integration/prototypes.py)


def evenly_spaced(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` (at least 1, at most all) evenly spaced rows of ``rows``: a mixture's domains are all represented."""
    return rows[torch.linspace(0, len(rows) - 1, min(len(rows), max(1, count))).round().long().unique()]


class RecipeData:
    """Training blocks, validation windows and optional test windows, all from one tokenizer.

    ``dataset`` may list several sources (``a.txt,b.jsonl``, see ``llama_expert.data.mixture``): training
    then takes ``--dataset-weights`` tokens from each, validation takes an equal share of
    ``eval_max_tokens`` from each, and ``domains``/``eval_domains`` label every block with its source.
    ``tests`` maps each test source's name to its windows.
    """

    def __init__(self, tokenizer, data: DataArguments, seq_len: int, max_samples: Optional[int],
                 eval_max_tokens: Optional[int], progress: bool = True):
        def tokens(docs):
            return tokenize_documents(docs, tokenizer, progress=progress)

        sources = split_sources(data.dataset)
        eval_sources = split_sources(data.eval_dataset) if data.eval_dataset else None
        if eval_sources is not None and len(eval_sources) != len(sources):
            raise DataError(f"--eval-dataset lists {len(eval_sources)} sources for {len(sources)} training datasets; "
                            f"give one per dataset, or leave it out.")
        self.names = [domain_name(s) for s in sources]
        share = eval_max_tokens // len(sources) if eval_max_tokens else None
        train_blocks, eval_windows = [], []
        for i, source in enumerate(sources):
            train_docs, eval_docs = self._train_and_validation(tokenizer, source, data.dataset_config,
                                                               eval_sources[i] if eval_sources else None)
            train_blocks.append(pack_blocks(tokens(train_docs), seq_len))
            eval_windows.append(pack_blocks(tokens(eval_docs), seq_len, max_tokens=share))
        self.train, self.domains = mix_blocks(train_blocks, parse_weights(data.dataset_weights, len(sources)),
                                              self.names)
        if max_samples is not None:  # a cap keeps the mix: take an evenly spaced subset
            keep = torch.linspace(0, len(self.train) - 1, min(max_samples, len(self.train))).round().long()
            self.train, self.domains = self.train[keep], self.domains[keep]
        self.eval = torch.cat(eval_windows)
        self.eval_domains = torch.cat([torch.full((len(w),), d, dtype=torch.long) for d, w in enumerate(eval_windows)])
        self.tests: Dict[str, torch.Tensor] = {}
        for source in split_sources(data.test_dataset) if data.test_dataset else []:
            docs = load_split(source, None, tokenizer, "test")
            self.tests[domain_name(source)] = pack_blocks(tokens(docs), data.test_seq_len or seq_len,
                                                          max_tokens=data.test_max_tokens)

    @staticmethod
    def _train_and_validation(tokenizer, source, config, eval_source):
        """Validation never overlaps training: without an eval source, a single file's last 5% is held out
        of training (load_text_dataset); with one, the whole training file trains."""
        if eval_source:
            return (load_split(source, config, tokenizer, "train"),
                    load_split(eval_source, config, tokenizer, "validation"))
        splits = load_text_dataset(source, config, tokenizer)
        name = source or EMBEDDED_DATASET
        return select_split(splits, "train", name), select_split(splits, "validation", name)


def measure_tests(model, tests: Dict[str, torch.Tensor], autocast, progress: bool) -> Dict[str, object]:
    """Perplexity on each test set and, for several, ``mean``: exp of the mean of their log-perplexities. The d-th
    test set is labelled domain d, as the d-th training dataset (what the oracle router routes by)."""
    per_domain = {name: evaluate_perplexity(model, windows, autocast_dtype=autocast, progress=progress,
                                            domains=torch.full((len(windows),), index))
                  for index, (name, windows) in enumerate(tests.items())}
    if len(per_domain) == 1:
        return next(iter(per_domain.values()))
    mean_nll = sum(r["nll"] for r in per_domain.values()) / len(per_domain)
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "domains": per_domain,
            "tokens": sum(r["tokens"] for r in per_domain.values()),
            "windows": sum(r["windows"] for r in per_domain.values()),
            "seq_len": next(iter(per_domain.values()))["seq_len"]}


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
    for path in method.reads():
        stands = relation(output_dir, path)
        if stands:  # --overwrite would delete what the run is about to read
            raise ConfigError(f"--output-dir {output_dir} {stands} the adapter the run starts from ({path}); pass "
                              f"another --output-dir.")
    check_output_folder(output_dir, args.resume, args.overwrite)
    accelerator = make_accelerator(args)
    with RunLock(output_dir) if accelerator.is_main_process else nullcontext():
        if args.resume:  # under the lock: a run writing there now is the better answer than its missing checkpoint
            # before the model loads (load_latest checks it again for train_model, which skips this function)
            require_checkpoint(output_dir / "checkpoints")
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
    mix = "" if len(data.names) == 1 else " (" + ", ".join(
        f"{name} {int((data.domains == d).sum())}" for d, name in enumerate(data.names)) + " blocks)"
    say(f"data: {data.train.shape[0]} training blocks x {args.seq_len} tokens ({data.train.numel():,} tokens){mix}, "
        f"validation {data.eval.numel():,} tokens")
    autocast = autocast_dtype(accelerator)
    model.to(accelerator.device)
    test_before = measure_tests(model, data.tests, autocast, progress) if data.tests and main and not args.resume \
        else None
    result = train_model(model, method, data.train, data.eval, args, run_config={"method": method.name, **settings},
                         accelerator=accelerator, domains=data.domains, eval_domains=data.eval_domains)
    if not main:
        return result
    output_dir = Path(args.output_dir)
    usage = evenly_spaced(torch.arange(len(data.eval)), USAGE_TOKENS // args.seq_len)  # every domain is represented
    method.after_training(model, data.eval[usage], output_dir, result.steps, progress=progress,
                          domains=data.eval_domains[usage], domain_names=data.names)
    sample = evenly_spaced(torch.arange(len(data.train)), PROTOTYPE_TOKENS // args.seq_len)
    save_prototypes(measure_prototypes(model, data.train[sample], args.batch_size, domains=data.domains[sample]),
                    output_dir)
    summary = {"method": method.name, "settings": settings, "training_arguments": asdict(args), "steps": result.steps,
               "tokens": result.tokens, "seconds": result.seconds, "peak_memory": result.peak_memory,
               "initial_validation": result.initial_eval, "final_validation": result.final_eval,
               "best_validation": result.best_eval, "stopped_early": result.stopped_early,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    say("")
    say(result.summary())
    if data.tests:
        test_after = measure_tests(model, data.tests, autocast, progress)
        result.test = summary["test"] = {"dataset": data_args.test_dataset, "before": test_before,
                                         "after": test_after}
        if test_before:
            change = 100 * (test_after["perplexity"] - test_before["perplexity"]) / test_before["perplexity"]
            what = "test perplexity" if "domains" not in test_after else "mean test perplexity (exp of mean log)"
            say(f"{what} {test_before['perplexity']:.3f} -> {test_after['perplexity']:.3f} ({change:+.1f}%) "
                f"on {test_after['tokens']:,} tokens in {test_after['windows']} windows of {test_after['seq_len']}")
            for name, after in test_after.get("domains", {}).items():
                before = test_before["domains"][name]["perplexity"]
                say(f"  {name}: {before:.3f} -> {after['perplexity']:.3f} "
                    f"({100 * (after['perplexity'] - before) / before:+.1f}%)")
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
