"""``compare``: the base model, the MoE-augmented model and (``--lora-baseline``) plain LoRA, in one run.

Training happens in child processes (``llama-expert train``), one per method with identical data, steps,
batch, sequence length and learning rate, so each reports its own peak memory. The measurements then
happen here, in one process, on the same windows: perplexity of each model, decode/prefill throughput
with the repeats interleaved (ratios to the base from the same run), parameter and memory figures, and
the MoE expert usage. Output: a terminal table, ``compare.json``, ``report.md`` and PNG charts.

A LoRA adapter is measured as trained (unmerged). Merged into the base weights it would decode at the
base's speed; MoE adapters cannot be merged, since their routing depends on the token.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import ConfigError
from ..files import atomic_write_text, write_problem
from ..integration.adapter_files import load_adapter_weights
from ..integration.base_models import (DEFAULT_MODEL, check_within_context, load_base_config, load_base_model,
                                       load_tokenizer)
from ..integration.loading import ModelArguments
from ..integration.surgery import adapter_parameters, adapters, is_augmented, parameter_counts
from ..options import fields_named, flag_of, option
from ..progress import shows_progress
from ..training.arguments import DataArguments, TrainingArguments
from ..integration.peft_lora import load_lora_model, matched_lora_rank
from ..training.run_folder import LOCK_NAME
from .benchmark import ExpertModelBenchmark, environment
from .reports import compare_charts, compare_markdown, compare_table, save_domain_heatmap, save_usage_heatmap
from .routing_health import expert_usage_by_domain
from .throughput import ThroughputArguments, measure_interleaved

# The training settings both methods share, and compare's defaults for them (a short run).
TRAINING_FIELDS = ("seq_len", "batch_size", "gradient_accumulation_steps", "max_steps", "max_samples",
                   "learning_rate", "eval_every", "eval_max_tokens", "seed")
DATA_FIELDS = ("dataset", "dataset_weights", "dataset_config", "eval_dataset")
TRAINING_DEFAULTS = {"seq_len": 512, "batch_size": 4, "max_steps": 100, "learning_rate": 2e-3, "eval_every": 50,
                     "eval_max_tokens": 8192}


@dataclass
class CompareArguments:
    lora_baseline: bool = option(False, "add a PEFT LoRA baseline at a matched budget")
    lora_adapter: Optional[str] = option(None, "a trained LoRA folder (else one is trained here)")
    lora_r: Optional[int] = option(None, "LoRA rank (default: matched to the MoE budget)")
    moe_args: Optional[str] = option(None, "extra `train` flags for the MoE run, e.g. '--lora-r 32'")
    output_dir: str = option("docs/results/compare", "where compare.json, report.md and the charts go")
    overwrite: bool = option(False, "retrain OUTPUT_DIR/moe (and /lora) when they already hold a run")
    test_dataset: str = option("embedded", "dataset (file, folder, Hub name) to measure on; several, comma-"
                                           "separated: each domain, the exp of their mean log-perplexity and "
                                           "the domain-expert mutual information")
    split: str = option("test", "split to measure on")
    eval_seq_len: int = option(512, "perplexity window length")
    max_tokens: int = option(16384, "tokens measured")
    eval_dtype: Optional[str] = option(None, "base weights dtype while measuring (default float32)")
    routing_windows: int = option(8, "test windows (per domain) routed to measure MoE expert usage")
    progress: bool = option(True, "no progress bars")


def training_command(method: str, out: Path, model_args: ModelArguments, training: TrainingArguments,
                     data: DataArguments, extra: List[str], progress: bool = False,
                     overwrite: bool = False) -> List[str]:
    """The child ``train`` command. A token travels in the environment (HF_TOKEN), never in argv.

    ``out`` is ``OUTPUT_DIR/moe`` or ``OUTPUT_DIR/lora``; ``overwrite`` (compare's ``--overwrite``) lets the
    child replace a run already there. ``progress``: let the child draw its training bar (it shares our
    stderr; pass it only for a terminal)."""
    cmd = [sys.executable, "-m", "llama_expert.cli", "train", "--method", method,
           "--model", model_args.model or DEFAULT_MODEL, "--output-dir", str(out)]
    if overwrite:
        cmd.append("--overwrite")
    if not progress:
        cmd.append("--no-progress")
    if model_args.dtype:
        cmd += ["--dtype", model_args.dtype]
    for settings, names in ((data, DATA_FIELDS), (training, TRAINING_FIELDS)):
        for field in fields_named(type(settings), names):
            value = getattr(settings, field.name)
            if value is not None:
                cmd += [flag_of(field), str(value)]
    return cmd + extra


@contextmanager
def _stage(what: str):
    """A line as a stage starts and one as it ends: compare runs for many minutes, one stage after another."""
    print(f"{what} ...", flush=True)
    started = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - started:.0f} s", flush=True)


def _run_training(method: str, cmd: List[str], auth_token: Optional[str]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if auth_token:
        env["HF_TOKEN"] = auth_token
    print(flush=True)
    with _stage(f"[{method}] training"):
        print(f"[{method}] python {' '.join(cmd[1:])}", flush=True)
        child = subprocess.Popen(cmd, env=env)
        try:
            code = child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too: let it finish its step and save a checkpoint
            child.wait()
            raise
        if code != 0:
            raise ConfigError(f"training the {method} adapter failed (exit {code}); see the output above.")


def _summary(folder: Optional[Path]) -> dict:
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
    files that a training run holds too, expert_usage.png), and no child run replaces one it did not make
    unless ``--overwrite`` says so (a rerun of compare into the same folder needs it too)."""
    problem = write_problem(a.output_dir)
    if problem:
        raise ConfigError(f"--output-dir {a.output_dir} is not writable ({problem}); pass a folder you can write to.")
    out = Path(a.output_dir).resolve()
    for given in filter(None, adapters_given):
        if out == Path(given).resolve() or out.is_relative_to(Path(given).resolve()):
            raise ConfigError(f"--output-dir {a.output_dir} is or lies inside the adapter folder {given}: compare "
                              f"would write its report over that run's files; pass another --output-dir.")
    for child in children:
        present = sorted(p.name for p in child.iterdir() if p.name != LOCK_NAME) if child.is_dir() else []
        if present and not a.overwrite:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            measure = "--adapter" if child.name == "moe" else "--lora-adapter"
            raise ConfigError(f"{child} already holds a run ({shown}), and compare would train its {child.name} "
                              f"adapter there: pass {measure} {child} to measure that run, --overwrite to retrain it, "
                              f"or another --output-dir.")


def run_compare(model_args: Optional[ModelArguments] = None, settings: Optional[CompareArguments] = None,
                training: Optional[TrainingArguments] = None, data: Optional[DataArguments] = None,
                throughput_args: Optional[ThroughputArguments] = None, command: Optional[str] = None) -> dict:
    """Train (or load) the MoE adapter and optionally a LoRA baseline, then measure all models side by side.

    ``model_args``: the base model, the MoE adapter folder (else one is trained), the token and the
    training dtype. ``training``/``data``: the settings both methods train with. ``command``: the command
    line to record in the report (tokens must already be redacted).
    """
    model_args = model_args or ModelArguments(model=DEFAULT_MODEL)
    a = settings or CompareArguments()
    training = training or TrainingArguments(**TRAINING_DEFAULTS)
    data = data or DataArguments()
    t = throughput_args or ThroughputArguments()
    if a.lora_adapter and not a.lora_baseline:
        raise ConfigError("--lora-adapter needs --lora-baseline.")
    model_id = model_args.model or DEFAULT_MODEL
    _check_measurement(a, model_id, model_args.auth_token)
    out = Path(a.output_dir)
    moe_dir = Path(model_args.adapter) if model_args.adapter else out / "moe"
    trained_here = ([] if model_args.adapter else [moe_dir]) + \
        ([out / "lora"] if a.lora_baseline and not a.lora_adapter else [])
    check_outputs(a, trained_here, [model_args.adapter, a.lora_adapter])
    out.mkdir(parents=True, exist_ok=True)
    child_progress = shows_progress(a.progress)
    if not model_args.adapter:
        _run_training("moe", training_command("moe", moe_dir, model_args, training, data,
                                              a.moe_args.split() if a.moe_args else [], child_progress, a.overwrite),
                      model_args.auth_token)
    base = load_base_model(model_id, auth_token=model_args.auth_token, dtype=a.eval_dtype)
    tokenizer = load_tokenizer(model_id, auth_token=model_args.auth_token)
    moe = load_adapter_weights(copy.deepcopy(base), moe_dir).eval()
    moe_trainable = parameter_counts(moe)["trainable"]

    lora, lora_dir = None, None
    if a.lora_baseline:
        lora_dir = Path(a.lora_adapter) if a.lora_adapter else out / "lora"
        if not a.lora_adapter:
            rank = a.lora_r or matched_lora_rank(base, moe_trainable)
            _run_training("lora", training_command("lora", lora_dir, model_args, training, data,
                                                   ["--lora-r", str(rank)], child_progress, a.overwrite),
                          model_args.auth_token)
        lora = load_lora_model(copy.deepcopy(base), lora_dir)

    models = {"base": base, "moe": moe}
    if lora is not None:
        models["lora"] = lora
    summaries = {"base": {}, "moe": _summary(moe_dir), "lora": _summary(lora_dir)}
    rows: Dict[str, dict] = {}
    windows = window_domains = None
    for name, model in models.items():
        bench = ExpertModelBenchmark(model, tokenizer, dataset=a.test_dataset, split=a.split, seq_len=a.eval_seq_len,
                                     max_tokens=a.max_tokens, windows=windows, window_domains=window_domains,
                                     progress=a.progress)
        with _stage(f"[{name}] perplexity"):
            ppl = bench.benchmark_perplexity()
        windows, window_domains = bench.windows(), bench.window_domains()  # the very same windows for every model
        s = summaries[name]
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
    if lora is not None and rows["moe"]["training_steps"] != rows["lora"]["training_steps"]:
        print(f"warning: MoE trained {rows['moe']['training_steps']} steps, LoRA {rows['lora']['training_steps']}")

    throughput = None
    if not t.skip_throughput:
        names = list(models)
        with _stage(f"[{', '.join(names)}] throughput, repeats interleaved"):
            measured = measure_interleaved([models[n] for n in names], t.num_samples, t.prompt_len, t.new_tokens,
                                           t.throughput_batch_sizes, a.progress, t.kv_cache)
        throughput = {n: m for n, m in zip(names, measured)}
        for n in names:
            rows[n]["throughput"] = []
            for mine, base_row in zip(throughput[n]["results"], throughput["base"]["results"]):
                rows[n]["throughput"].append({
                    "batch_size": mine["batch_size"], "decode_tokens_per_s": mine["decode_tokens_per_s"],
                    "prefill_tokens_per_s": mine["prefill_tokens_per_s"],
                    "decode_ratio": mine["decode_tokens_per_s"] / base_row["decode_tokens_per_s"],
                    "prefill_ratio": mine["prefill_tokens_per_s"] / base_row["prefill_tokens_per_s"]})

    with _stage("[moe] expert usage"):
        names = bench.domain_names
        if names:  # the first routing_windows windows of each domain
            keep = torch.cat([(window_domains == d).nonzero()[:, 0][: a.routing_windows] for d in range(len(names))])
            usage = expert_usage_by_domain(moe, windows[keep], window_domains[keep], names, progress=a.progress)
        else:
            usage = expert_usage_by_domain(moe, windows[: a.routing_windows], progress=a.progress)
    report = {"date": time.strftime("%Y-%m-%d"), "environment": environment(next(base.parameters()).device),
              "model": model_id, "test_dataset": a.test_dataset, "split": a.split, "eval_seq_len": a.eval_seq_len,
              "max_tokens": a.max_tokens, "eval_dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
              "moe_adapter": str(moe_dir), "lora_adapter": str(lora_dir) if lora_dir else None,
              "training": {n: summaries[n].get("training_arguments") for n in ("moe", "lora") if summaries[n]},
              "results": rows, "throughput_detail": throughput, "expert_usage": usage,
              "moe_layers": len(adapters(moe)), "command": command or "run_compare(...) from Python"}
    if lora is not None:
        report["winner_perplexity"] = "moe" if rows["moe"]["perplexity"] < rows["lora"]["perplexity"] else "lora"
    atomic_write_text(out / "compare.json", json.dumps(report, indent=1) + "\n")
    charts = compare_charts(report, out)
    save_usage_heatmap(usage, out / "expert_usage.png", title="MoE expert usage on the test windows")
    charts.append("expert_usage.png")
    if len(names) > 1:
        save_domain_heatmap(usage, out / "domain_expert_usage.png", title="MoE domain x expert usage")
        charts.append("domain_expert_usage.png")
    atomic_write_text(out / "report.md", compare_markdown(report, charts))
    print()
    print(compare_table(report))
    print(f"\nwrote {out / 'compare.json'}, {out / 'report.md'} and charts in {out}")
    return report
