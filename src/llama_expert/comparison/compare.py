"""``compare``: the base model, the MoE-augmented model and (``--lora-baseline``) plain LoRA, in one run.

Training happens in child processes (``children.py``: what ``llama-expert train`` runs), one per method with
identical data, steps, batch, sequence length and learning rate, so each reports its own peak memory. The measurements then
happen here, in one process, on the same windows: perplexity of each model, decode/prefill throughput
with the repeats interleaved (ratios to the base from the same run), parameter and memory figures, and
the MoE expert usage. Output: a terminal table, ``compare.json``, ``report.md`` and PNG charts.

A LoRA adapter is measured as trained (unmerged). Merged into the base weights it would decode at the
base's speed; MoE adapters cannot be merged, since their routing depends on the token.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import ExpertConfig
from ..errors import ConfigError
from ..files import atomic_write_text, held_files, relation, shown_names, unusable_output
from ..integration.adapter_files import load_adapter_weights
from ..integration.base_models import (DEFAULT_MODEL, check_within_context, load_base_config, load_base_model,
                                       load_tokenizer)
from ..integration.loading import ModelArguments
from ..integration.surgery import adapter_parameters, adapters, is_augmented, parameter_counts
from ..options import option
from ..progress import shows_progress
from ..training.arguments import DataArguments, TrainingArguments
from ..integration.peft_lora import load_lora_model, matched_lora_rank
from ..training.methods import LoRAMethod, MoEMethod
from ..evaluation.benchmark import ExpertModelBenchmark, environment
from ..evaluation.throughput import ThroughputArguments, measure_interleaved
from ..metrics.plots import save_domain_heatmap, save_usage_heatmap
from ..metrics.routing import expert_usage_by_domain
from .children import train_in_child
from .report import compare_charts, compare_markdown, compare_table

# The training settings both methods share, and compare's defaults for them (a short run).
TRAINING_FIELDS = ("seq_len", "batch_size", "gradient_accumulation_steps", "max_steps", "max_samples",
                   "learning_rate", "eval_every", "eval_max_tokens", "seed")
DATA_FIELDS = ("dataset", "dataset_weights", "dataset_config", "eval_dataset")
REPORT_FILES = ("compare.json", "report.md")  # an earlier compare's report, replaced only with --overwrite
TRAINING_DEFAULTS = {"seq_len": 512, "batch_size": 4, "max_steps": 100, "learning_rate": 2e-3, "eval_every": 50,
                     "eval_max_tokens": 8192}


@dataclass
class CompareArguments:
    lora_baseline: bool = option(False, "add a PEFT LoRA baseline at a matched budget")
    lora_adapter: Optional[str] = option(None, "a trained LoRA folder (else one is trained here)")
    lora_r: Optional[int] = option(None, "LoRA rank (default: matched to the MoE budget)")
    output_dir: str = option("docs/results/compare", "where compare.json, report.md and the charts go")
    overwrite: bool = option(False, "replace the report of an earlier compare in OUTPUT_DIR, and retrain "
                                    "OUTPUT_DIR/moe (and /lora) when they already hold a run")
    test_dataset: str = option("embedded", "dataset (file, folder, Hub name) to measure on; several, comma-"
                                           "separated: each domain, the exp of their mean log-perplexity and "
                                           "the domain-expert mutual information")
    split: str = option("test", "split to measure on")
    eval_seq_len: int = option(512, "perplexity window length")
    max_tokens: int = option(16384, "tokens measured")
    eval_dtype: Optional[str] = option(None, "base weights dtype while measuring (default float32)")
    routing_windows: int = option(8, "test windows (per domain) routed to measure MoE expert usage")
    progress: bool = option(True, "no progress bars")


@contextmanager
def _stage(what: str):
    """A line as a stage starts and one as it ends: compare runs for many minutes, one stage after another."""
    print(f"{what} ...", flush=True)
    started = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - started:.0f} s", flush=True)


def _train(method, out: Path, model_args: ModelArguments, training: TrainingArguments, data: DataArguments,
           a: CompareArguments) -> None:
    """Train ``method`` into ``out`` in a child process, with the settings both methods share."""
    settings = replace(training, output_dir=str(out), overwrite=a.overwrite, progress=shows_progress(a.progress))
    print(flush=True)
    with _stage(f"[{method.name}] training into {out}"):
        train_in_child(method, settings, data, model_args.model or DEFAULT_MODEL, model_args.auth_token,
                       model_args.dtype)


def _summary(folder: Optional[Path]) -> dict:
    """The training run's summary in ``folder`` ({} when there is none: a given adapter may come without one)."""
    path = folder / "training_summary.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def _adapter_size(model) -> int:
    """Parameters the method added and trained (PEFT loads LoRA frozen, so count by name)."""
    if is_augmented(model):
        return sum(p.numel() for p in adapter_parameters(model))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _check_measurement(a: CompareArguments, model_id: str, auth_token: Optional[str]) -> None:
    """compare's own flags, checked before anything trains (the benchmark's messages name its flags)."""
    if a.eval_seq_len < 2:
        raise ConfigError(f"--eval-seq-len must be >= 2 (a window predicts eval_seq_len - 1 tokens), got "
                          f"{a.eval_seq_len}.")
    if a.max_tokens < a.eval_seq_len:
        raise ConfigError(f"--max-tokens {a.max_tokens} is less than one window of --eval-seq-len {a.eval_seq_len}; "
                          f"raise --max-tokens or lower --eval-seq-len.")
    check_within_context(load_base_config(model_id, auth_token=auth_token), a.eval_seq_len, "--eval-seq-len")


def check_outputs(a: CompareArguments, children: List[Path], adapters_given: List[Optional[str]]) -> None:
    """Before anything trains: ``--output-dir`` can be written, is no given adapter's folder (compare writes
    files that a training run holds too, expert_usage.png), and neither its report nor a child run replaces one
    it did not make unless ``--overwrite`` says so (a rerun of compare into the same folder needs it too)."""
    problem = unusable_output(a.output_dir)
    if problem:
        raise ConfigError(problem)
    report = [name for name in REPORT_FILES if (Path(a.output_dir) / name).exists()]
    if report and not a.overwrite:
        raise ConfigError(f"--output-dir {a.output_dir} already holds a compare report ({', '.join(report)}); pass "
                          f"--overwrite to replace it, or another --output-dir.")
    for given in filter(None, adapters_given):
        if relation(a.output_dir, given) in ("is", "lies inside"):
            raise ConfigError(f"--output-dir {a.output_dir} is or lies inside the adapter folder {given}: compare "
                              f"would write its report over that run's files; pass another --output-dir.")
    for child in children:
        present = held_files(child)
        if present and not a.overwrite:
            measure = "--adapter" if child.name == "moe" else "--lora-adapter"
            raise ConfigError(f"{child} already holds a run ({shown_names(present, 3)}), and compare would train "
                              f"its {child.name} adapter there: pass {measure} {child} to measure that run, "
                              f"--overwrite to retrain it, or another --output-dir.")


def run_compare(model_args: Optional[ModelArguments] = None, settings: Optional[CompareArguments] = None,
                training: Optional[TrainingArguments] = None, data: Optional[DataArguments] = None,
                throughput_args: Optional[ThroughputArguments] = None, command: Optional[str] = None,
                moe_config: Optional[ExpertConfig] = None) -> dict:
    """Train (or load) the MoE adapter and optionally a LoRA baseline, then measure all models side by side.

    ``model_args``: the base model, the MoE adapter folder (else one is trained with ``moe_config``, default
    ``ExpertConfig()``), the token and the training dtype. ``training``/``data``: the settings both methods
    train with. ``command``: the command line to record in the report (tokens must already be redacted).
    """
    model_args = model_args or ModelArguments(model=DEFAULT_MODEL)
    a = settings or CompareArguments()
    training = training or TrainingArguments(**TRAINING_DEFAULTS)
    data = data or DataArguments()
    t = throughput_args or ThroughputArguments()
    model_id = model_args.model or DEFAULT_MODEL
    out, moe_dir, lora_dir, moe = _plan(model_args, a, model_id, moe_config)
    if moe is not None:
        _train(moe, moe_dir, model_args, training, data, a)
    base = load_base_model(model_id, auth_token=model_args.auth_token, dtype=a.eval_dtype)
    models = {"base": base, "moe": load_adapter_weights(copy.deepcopy(base), moe_dir).eval()}
    if lora_dir is not None:
        if not a.lora_adapter:
            rank = a.lora_r or matched_lora_rank(base, parameter_counts(models["moe"])["trainable"])
            _train(LoRAMethod.from_expert_config(ExpertConfig(lora_r=rank)), lora_dir, model_args, training, data, a)
        models["lora"] = load_lora_model(copy.deepcopy(base), lora_dir)
    tokenizer = load_tokenizer(model_id, auth_token=model_args.auth_token)
    summaries = {"moe": _summary(moe_dir), "lora": _summary(lora_dir)}  # each read once
    rows, bench = _measure_perplexity(models, tokenizer, a, summaries)
    throughput = None if t.skip_throughput else _measure_speed(models, rows, a, t)
    usage = _measure_usage(models["moe"], bench, a)
    report = {"date": time.strftime("%Y-%m-%d"), "environment": environment(next(base.parameters()).device),
              "model": model_id, "test_dataset": a.test_dataset, "split": a.split, "eval_seq_len": a.eval_seq_len,
              "max_tokens": a.max_tokens, "eval_dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
              "moe_adapter": str(moe_dir), "lora_adapter": str(lora_dir) if lora_dir else None,
              "training": {n: s.get("training_arguments") for n, s in summaries.items() if s},
              "results": rows, "throughput_detail": throughput, "expert_usage": usage,
              "moe_layers": len(adapters(models["moe"])), "command": command or "run_compare(...) from Python"}
    if "lora" in models:
        report["winner_perplexity"] = "moe" if rows["moe"]["perplexity"] < rows["lora"]["perplexity"] else "lora"
    _write_report(report, usage, bench.domain_names, out)
    return report


def _plan(model_args: ModelArguments, a: CompareArguments, model_id: str, moe_config: Optional[ExpertConfig]):
    """(output folder, MoE adapter folder, LoRA folder or None, the MoE method to train or None), after every
    check that needs no model: what ``train`` checks of the MoE run's settings included."""
    if a.lora_adapter and not a.lora_baseline:
        raise ConfigError("--lora-adapter needs --lora-baseline.")
    if model_args.adapter and moe_config is not None:
        raise ConfigError(f"--moe-args sets up the MoE adapter compare trains, and --adapter {model_args.adapter} "
                          f"measures a trained one instead; drop one of them.")
    moe = None if model_args.adapter else MoEMethod(moe_config or ExpertConfig())
    if moe is not None:
        moe.check()
    _check_measurement(a, model_id, model_args.auth_token)
    out = Path(a.output_dir)
    moe_dir = Path(model_args.adapter) if model_args.adapter else out / "moe"
    lora_dir = (Path(a.lora_adapter) if a.lora_adapter else out / "lora") if a.lora_baseline else None
    trained_here = ([] if model_args.adapter else [moe_dir]) + ([lora_dir] if lora_dir and not a.lora_adapter else [])
    check_outputs(a, trained_here, [model_args.adapter, a.lora_adapter])
    out.mkdir(parents=True, exist_ok=True)
    return out, moe_dir, lora_dir, moe


def _measure_perplexity(models: Dict[str, object], tokenizer, a: CompareArguments,
                        summaries: Dict[str, dict]):
    """Each model's perplexity on the very same windows, with its size and its training run's figures."""
    rows: Dict[str, dict] = {}
    windows = window_domains = bench = None
    for name, model in models.items():
        bench = ExpertModelBenchmark(model, tokenizer, dataset=a.test_dataset, split=a.split, seq_len=a.eval_seq_len,
                                     max_tokens=a.max_tokens, windows=windows, window_domains=window_domains,
                                     progress=a.progress)
        with _stage(f"[{name}] perplexity"):
            ppl = bench.benchmark_perplexity()
        windows, window_domains = bench.windows(), bench.window_domains()
        s = summaries.get(name, {})
        rows[name] = {"perplexity": ppl["perplexity"], "tokens_evaluated": ppl["tokens_evaluated"],
                      "trainable_parameters": _adapter_size(model),
                      "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "training_peak_memory_bytes": (s.get("peak_memory") or {}).get("bytes"),
                      "training_seconds": s.get("seconds"), "training_steps": s.get("steps"),
                      "training_tokens": s.get("tokens")}
        if "domains" in ppl:
            rows[name]["domains"] = {d: r["perplexity"] for d, r in ppl["domains"].items()}
        print(f"[{name}] perplexity {ppl['perplexity']:.3f} on {ppl['tokens_evaluated']:,} tokens"
              + "".join(f", {d} {r['perplexity']:.3f}" for d, r in ppl.get("domains", {}).items()), flush=True)
    if "lora" in rows and rows["moe"]["training_steps"] != rows["lora"]["training_steps"]:
        print(f"warning: MoE trained {rows['moe']['training_steps']} steps, LoRA {rows['lora']['training_steps']}")
    return rows, bench


def _measure_speed(models: Dict[str, object], rows: Dict[str, dict], a: CompareArguments,
                   t: ThroughputArguments) -> dict:
    """Decode and prefill tokens/s of every model with the repeats interleaved; ratios to the base's."""
    names = list(models)
    with _stage(f"[{', '.join(names)}] throughput, repeats interleaved"):
        measured = measure_interleaved([models[n] for n in names], t.num_samples, t.prompt_len, t.new_tokens,
                                       t.throughput_batch_sizes, a.progress, t.kv_cache, t.compiled_decode)
    throughput = dict(zip(names, measured))
    for n in names:
        rows[n]["throughput"] = [
            {"batch_size": mine["batch_size"], "decode_tokens_per_s": mine["decode_tokens_per_s"],
             "prefill_tokens_per_s": mine["prefill_tokens_per_s"],
             "decode_ratio": mine["decode_tokens_per_s"] / base_row["decode_tokens_per_s"],
             "prefill_ratio": mine["prefill_tokens_per_s"] / base_row["prefill_tokens_per_s"]}
            for mine, base_row in zip(throughput[n]["results"], throughput["base"]["results"])]
    return throughput


def _measure_usage(moe, bench: ExpertModelBenchmark, a: CompareArguments) -> list:
    """The MoE adapters' expert usage on the first ``routing_windows`` test windows (of each domain)."""
    windows, window_domains, names = bench.windows(), bench.window_domains(), bench.domain_names
    with _stage("[moe] expert usage"):
        if not names:
            return expert_usage_by_domain(moe, windows[: a.routing_windows], progress=a.progress)
        keep = torch.cat([(window_domains == d).nonzero()[:, 0][: a.routing_windows] for d in range(len(names))])
        return expert_usage_by_domain(moe, windows[keep], window_domains[keep], names, progress=a.progress)


def _write_report(report: dict, usage: list, domain_names, out: Path) -> None:
    """compare.json, the charts, report.md, and the table on the terminal."""
    atomic_write_text(out / "compare.json", json.dumps(report, indent=1) + "\n")
    charts = compare_charts(report, out)
    save_usage_heatmap(usage, out / "expert_usage.png", title="MoE expert usage on the test windows")
    charts.append("expert_usage.png")
    if domain_names and len(domain_names) > 1:
        save_domain_heatmap(usage, out / "domain_expert_usage.png", title="MoE domain x expert usage")
        charts.append("domain_expert_usage.png")
    atomic_write_text(out / "report.md", compare_markdown(report, charts))
    print()
    print(compare_table(report))
    print(f"\nwrote {out / 'compare.json'}, {out / 'report.md'} and charts in {out}")
