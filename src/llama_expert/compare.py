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

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional


from .errors import ConfigError
from .models import DEFAULT_MODEL

TRAIN_FLAGS = ("dataset", "dataset_config", "eval_dataset", "seq_len", "batch_size", "max_steps", "learning_rate",
               "gradient_accumulation", "eval_every", "eval_max_tokens", "seed", "dtype", "max_samples")


def _train_command(method: str, out: Path, a, extra: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "llama_expert.cli", "train", "--method", method, "--model", a.model,
           "--output-dir", str(out), "--no-progress"]
    for flag in TRAIN_FLAGS:
        value = getattr(a, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    if a.auth_token:
        cmd += ["--auth-token", a.auth_token]
    return cmd + extra


def _run_training(method: str, out: Path, a, extra: List[str]) -> None:
    cmd = _train_command(method, out, a, extra)
    shown = " ".join("***" if a.auth_token and part == a.auth_token else part for part in cmd[1:])
    print(f"\n[{method}] python {shown}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise ConfigError(f"training the {method} adapter failed (exit {done.returncode}); see the output above.")
    print(f"[{method}] trained in {time.perf_counter() - started:.0f} s", flush=True)


def _summary(folder: Optional[Path]) -> dict:
    path = folder / "training_summary.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def _adapter_size(model) -> int:
    """Parameters the method added and trained (PEFT loads LoRA frozen, so count by name)."""
    from .surgery import adapter_parameters, is_augmented

    if is_augmented(model):
        return sum(p.numel() for p in adapter_parameters(model))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def run_compare(a) -> dict:
    from .adapter_files import load_adapter_weights
    from .benchmark import ExpertModelBenchmark, _measure_interleaved, environment
    from .lora_baseline import load_lora_model, matched_lora_rank
    from .models import load_base_model, load_tokenizer
    from .surgery import adapters, parameter_counts
    from .usage import measure_expert_usage, save_usage_heatmap

    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    moe_dir = Path(a.adapter) if a.adapter else out / "moe"
    if not a.adapter:
        _run_training("moe", moe_dir, a, a.moe_args.split() if a.moe_args else [])
    base = load_base_model(a.model, auth_token=a.auth_token, dtype=a.eval_dtype)
    tokenizer = load_tokenizer(a.model, auth_token=a.auth_token)
    moe = load_adapter_weights(copy.deepcopy(base), moe_dir).eval()
    moe_trainable = parameter_counts(moe)["trainable"]

    lora, lora_dir = None, None
    if a.lora_baseline:
        lora_dir = Path(a.lora_adapter) if a.lora_adapter else out / "lora"
        if not a.lora_adapter:
            rank = a.lora_r or matched_lora_rank(base, moe_trainable)
            _run_training("lora", lora_dir, a, ["--lora-r", str(rank)])
        lora = load_lora_model(copy.deepcopy(base), lora_dir)

    models = {"base": base, "moe": moe}
    if lora is not None:
        models["lora"] = lora
    summaries = {"base": {}, "moe": _summary(moe_dir), "lora": _summary(lora_dir)}
    rows: Dict[str, dict] = {}
    windows = None
    for name, model in models.items():
        bench = ExpertModelBenchmark(model, tokenizer, dataset=a.test_dataset, split=a.split, seq_len=a.eval_seq_len,
                                     max_tokens=a.max_tokens)
        if windows is not None:
            bench._windows = windows  # the very same windows for every model
        ppl = bench.benchmark_perplexity()
        windows = bench.windows()
        s = summaries[name]
        rows[name] = {"perplexity": ppl["perplexity"], "tokens_evaluated": ppl["tokens_evaluated"],
                      "trainable_parameters": _adapter_size(model),
                      "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "training_peak_memory_bytes": (s.get("peak_memory") or {}).get("bytes"),
                      "training_seconds": s.get("seconds"), "training_steps": s.get("steps"),
                      "training_tokens": s.get("tokens")}
        print(f"[{name}] perplexity {ppl['perplexity']:.3f} on {ppl['tokens_evaluated']:,} tokens", flush=True)
    if lora is not None and rows["moe"]["training_steps"] != rows["lora"]["training_steps"]:
        print(f"warning: MoE trained {rows['moe']['training_steps']} steps, LoRA {rows['lora']['training_steps']}")

    throughput = None
    if not a.skip_throughput:
        names = list(models)
        measured = _measure_interleaved([models[n] for n in names], a.num_samples, a.prompt_len, a.new_tokens,
                                        a.throughput_batch_sizes)
        throughput = {n: m for n, m in zip(names, measured)}
        for n in names:
            rows[n]["throughput"] = []
            for mine, base_row in zip(throughput[n]["results"], throughput["base"]["results"]):
                rows[n]["throughput"].append({
                    "batch_size": mine["batch_size"], "decode_tokens_per_s": mine["decode_tokens_per_s"],
                    "prefill_tokens_per_s": mine["prefill_tokens_per_s"],
                    "decode_ratio": mine["decode_tokens_per_s"] / base_row["decode_tokens_per_s"],
                    "prefill_ratio": mine["prefill_tokens_per_s"] / base_row["prefill_tokens_per_s"]})

    usage = measure_expert_usage(moe, windows[: a.routing_windows])
    report = {"date": time.strftime("%Y-%m-%d"), "environment": environment(next(base.parameters()).device),
              "model": a.model, "test_dataset": a.test_dataset, "split": a.split, "eval_seq_len": a.eval_seq_len,
              "max_tokens": a.max_tokens, "eval_dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
              "moe_adapter": str(moe_dir), "lora_adapter": str(lora_dir) if lora_dir else None,
              "training": {n: summaries[n].get("training_arguments") for n in ("moe", "lora") if summaries[n]},
              "results": rows, "throughput_detail": throughput, "expert_usage": usage,
              "moe_layers": len(adapters(moe)), "command": " ".join(["llama-expert"] + sys.argv[1:])}
    if lora is not None:
        report["winner_perplexity"] = "moe" if rows["moe"]["perplexity"] < rows["lora"]["perplexity"] else "lora"
    (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    charts = _charts(report, out)
    save_usage_heatmap(usage, out / "expert_usage.png", title="MoE expert usage on the test windows")
    (out / "report.md").write_text(markdown_report(report, charts + ["expert_usage.png"]))
    print()
    print(table(report))
    print(f"\nwrote {out / 'compare.json'}, {out / 'report.md'} and charts in {out}")
    return report


def _machine(env: dict) -> str:
    return (f"{env.get('platform')}, {os.cpu_count()} CPUs, device {env.get('device')} "
            f"({env.get('gpu', str(env.get('torch_threads')) + ' threads')}), torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}")


def _fmt_bytes(n: Optional[int]) -> str:
    return f"{n / 2**20:,.0f} MiB" if n else "-"


def table(report: dict) -> str:
    rows = report["results"]
    head = "| model | trainable params | test PPL | decode tok/s (b=1) | decode ratio | training peak memory | training time |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        t = (r.get("throughput") or [{}])[0]
        lines.append(f"| {name} | {r['trainable_parameters']:,} | {r['perplexity']:.3f} | "
                     f"{t.get('decode_tokens_per_s', float('nan')):.1f} | {t.get('decode_ratio', float('nan')):.3f} | "
                     f"{_fmt_bytes(r['training_peak_memory_bytes'])} | "
                     f"{(str(round(r['training_seconds'])) + ' s') if r['training_seconds'] else '-'} |")
    return "\n".join(lines)


def markdown_report(report: dict, charts: List[str]) -> str:
    rows = report["results"]
    lines = [f"# Comparison: base vs MoE adapters{' vs LoRA' if 'lora' in rows else ''}", "",
             f"- Date: {report['date']}; machine: {_machine(report['environment'])}",
             f"- Model: `{report['model']}`; test: `{report['test_dataset']}` ({report['split']}), windows of "
             f"{report['eval_seq_len']} tokens, {rows['base']['tokens_evaluated']:,} tokens predicted, "
             f"evaluation dtype {report['eval_dtype']}",
             f"- Command: `{report['command']}`", ""]
    for method, args in (report.get("training") or {}).items():
        if args:
            lines.append(f"- {method} training: {args.get('max_steps')} steps x batch {args.get('batch_size')} x "
                         f"{args.get('seq_len')} tokens, learning rate {args.get('learning_rate')}")
    lines += ["", table(report), ""]
    if "lora" in rows:
        moe, lora = rows["moe"]["perplexity"], rows["lora"]["perplexity"]
        winner = "MoE adapters" if moe < lora else "LoRA"
        lines.append(f"**Perplexity winner: {winner}** (MoE {moe:.3f} vs LoRA {lora:.3f}, base "
                     f"{rows['base']['perplexity']:.3f}; trainable parameters MoE "
                     f"{rows['moe']['trainable_parameters']:,} vs LoRA {rows['lora']['trainable_parameters']:,}).")
        lines.append("")
    lines.append("Decode ratio: tokens/s of the model divided by the base's, measured in the same run with the "
                 "repeats interleaved. LoRA is measured unmerged; merged, it decodes at the base's speed.")
    lines.append("")
    lines += [f"![{c}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def _charts(report: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    names = list(rows)
    made = []

    def bar(filename, labels, values, title, ylabel, fmt):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        colors = {"base": "#888888", "moe": "#2a7ab9", "lora": "#d9822b"}
        bars = ax.bar(labels, values, color=[colors.get(n, "#555555") for n in labels])
        for b, v in zip(bars, values):
            ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        made.append(filename)

    bar("perplexity.png", names, [rows[n]["perplexity"] for n in names], "Test perplexity (lower is better)",
        "perplexity", "{:.2f}")
    if all(rows[n].get("throughput") for n in names):
        bar("throughput.png", names, [rows[n]["throughput"][0]["decode_ratio"] for n in names],
            "Decode tokens/s relative to base (batch 1)", "ratio", "{:.3f}")
    trained = [n for n in names if n != "base"]
    if trained and all(rows[n]["training_peak_memory_bytes"] for n in trained):
        bar("memory.png", trained, [rows[n]["training_peak_memory_bytes"] / 2**20 for n in trained],
            "Peak training memory", "MiB", "{:,.0f}")
    return made


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: Hub id, folder, .gguf or smollm2-135m")
    p.add_argument("--auth-token", default=None)
    p.add_argument("--adapter", default=None, help="a trained MoE adapter folder (else one is trained here)")
    p.add_argument("--lora-baseline", action="store_true", help="add a PEFT LoRA baseline at a matched budget")
    p.add_argument("--lora-adapter", default=None, help="a trained LoRA folder (else one is trained here)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: matched to the MoE budget)")
    p.add_argument("--moe-args", default=None, help="extra `train` flags for the MoE run, e.g. '--lora-r 32'")
    p.add_argument("--output-dir", default="docs/results/compare")
    g = p.add_argument_group("training (both methods, identical)")
    g.add_argument("--dataset", default="embedded")
    g.add_argument("--dataset-config", default=None)
    g.add_argument("--eval-dataset", default=None)
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--gradient-accumulation", type=int, default=None)
    g.add_argument("--max-steps", type=int, default=100)
    g.add_argument("--max-samples", type=int, default=None)
    g.add_argument("--learning-rate", type=float, default=2e-3)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-max-tokens", type=int, default=8192)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--dtype", default=None, help="base weights dtype while training (bfloat16 is faster on CPUs with AMX)")
    g = p.add_argument_group("measurement (all models, identical)")
    g.add_argument("--test-dataset", default="embedded", help="dataset (file, folder, Hub name) to measure on")
    g.add_argument("--split", default="test")
    g.add_argument("--eval-seq-len", type=int, default=512)
    g.add_argument("--max-tokens", type=int, default=16384)
    g.add_argument("--eval-dtype", default=None, help="base weights dtype while measuring (default float32)")
    g.add_argument("--skip-throughput", action="store_true")
    g.add_argument("--num-samples", type=int, default=5)
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--throughput-batch-sizes", type=int, nargs="+", default=[1, 4])
    g.add_argument("--routing-windows", type=int, default=8)


def run_cli(a) -> int:
    if a.lora_adapter and not a.lora_baseline:
        raise ConfigError("--lora-adapter needs --lora-baseline.")
    run_compare(a)
    return 0
