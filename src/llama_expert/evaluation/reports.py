"""Reports for people: the benchmark's terminal table, compare's table, Markdown report and charts, and the
expert-usage heatmap. The only module that imports matplotlib (lazily, so the rest never pays for it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional


def _matplotlib_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


# ---------------------------------------------------------------------------------------------- benchmark
# One formatter per section, so that ``benchmark`` can print each section as soon as it is measured and
# the sections together are exactly ``format_report``'s table.
def format_header(report: Dict, info: Optional[Dict] = None) -> str:
    """The model and machine lines: needs only the report's ``model`` and ``environment``."""
    lines = []
    model = report["model"]
    params = model["parameters"]
    name = model["name"]
    if info and info.get("adapter"):
        what = f"{info['base_model']} + adapter {info['adapter']}"
    elif model["augmented"]:
        what = f"{name} + fresh MoE adapters"
    else:
        what = f"{name} (base model, no adapters)"
    env = report["environment"]
    lines.append("llama-expert benchmark")
    lines.append("=" * 72)
    lines.append(f"model              {what}")
    if info and info.get("fresh_adapter"):
        lines.append("                   note: untrained adapters compute exactly the base model, so these "
                     "numbers are the base's (plus adapter overhead in speed and memory)")
    if model["augmented"]:
        lines.append(f"parameters         {params['total']:,} total, {params['trainable']:,} trainable "
                     f"({params['trainable_percent']:.4f}%), experts per layer {params['experts_per_layer']}")
    else:
        lines.append(f"parameters         {params['total']:,}")
    lines.append(f"device             {env['device']} ({env['torch_threads']} threads), torch {env['torch']}, "
                 f"transformers {env['transformers']}")
    return "\n".join(lines)


def format_perplexity(ppl: Dict) -> str:
    if "domains" in ppl:
        lines = [f"Perplexity per domain (token-level, non-overlapping windows of {ppl['seq_len']} tokens)", "-" * 72]
        for name, one in ppl["domains"].items():
            cap = ", capped" if one["capped"] else ""
            lines.append(f"{name:<18} {one['perplexity']:.4f}   ({one['windows']} windows{cap}; {one['dataset']})")
        lines.append(f"{'mean':<18} {ppl['perplexity']:.4f}   (exp of the mean log-perplexity; "
                     f"{ppl['tokens_evaluated']:,} tokens predicted)")
        return "\n".join(lines)
    lines = ["Perplexity (token-level, non-overlapping windows)", "-" * 72]
    source = ppl["dataset"] + (f" ({ppl['dataset_config']})" if ppl.get("dataset_config") else "")
    lines.append(f"dataset            {source} [{ppl['split']}]")
    cap = f"; capped by --max-tokens {ppl['max_tokens']}" if ppl["capped"] else ""
    lines.append(f"evaluated          {ppl['windows']} windows x {ppl['seq_len']} tokens = "
                 f"{ppl['tokens_in_windows']:,} of {ppl['tokens_available']:,} tokens{cap}")
    lines.append(f"tokens predicted   {ppl['tokens_evaluated']:,}")
    lines.append(f"perplexity         {ppl['perplexity']:.4f}   (mean NLL {ppl['mean_nll']:.4f} nats/token)")
    if "word_perplexity" in ppl:
        lines.append(f"word perplexity    {ppl['word_perplexity']:.4f}   ({ppl['words']:,} words; lm-eval-harness "
                     f"style, a different number: do not compare with token perplexity)")
    return "\n".join(lines)


def format_routing_health(health: Dict) -> str:
    lines = [f"Routing health ({health['windows']} windows, {health['tokens']:,} tokens)", "-" * 72]
    nmi = bool(health["layers"]) and "domain_expert_nmi" in health["layers"][0]
    lines.append(f"{'layer':>5} {'experts':>7} {'min load':>9} {'max load':>9} {'entropy':>8}"
                 + (f" {'NMI':>6}" if nmi else "") + "  warnings")
    for layer in health["layers"]:
        lines.append(f"{layer['layer']:>5} {layer['num_experts']:>7} {layer['min_load']:>9.3f} "
                     f"{layer['max_load']:>9.3f} {layer['normalized_entropy']:>8.3f}"
                     + (f" {layer['domain_expert_nmi']:>6.3f}" if nmi else "") + f"  {len(layer['warnings'])}")
    lines.append("load: share of the token-slot assignments (uniform = 1/E); entropy normalised by log E"
                 + ("; NMI: normalised mutual information between domain and chosen expert" if nmi else ""))
    if health["warnings"]:
        shown = health["warnings"][:10]
        lines.append(f"WARNINGS ({len(health['warnings'])}):")
        lines += [f"  {w}" for w in shown]
        if len(health["warnings"]) > len(shown):
            lines.append(f"  ... {len(health['warnings']) - len(shown)} more in the JSON output")
    else:
        lines.append("no warnings: every expert gets at least 0.1/E of the load, none collapses")
    return "\n".join(lines)


def format_throughput(thr: Dict) -> str:
    lines = [f"Throughput (greedy, KV cache, prompt {thr['prompt_len']} + {thr['new_tokens']} new tokens, "
             f"median of {thr['num_samples']} after warm-up)", "-" * 72]
    lines.append(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/decode step':>15}")
    for row in thr["results"]:
        lines.append(f"{row['batch_size']:>5} {row['prefill_tokens_per_s']:>14,.1f} "
                     f"{row['decode_tokens_per_s']:>13,.1f} {row['decode_ms_per_step']:>15.1f}")
    return "\n".join(lines)


def format_memory(mem: Dict) -> str:
    lines = ["Memory", "-" * 72]
    lines.append(f"parameters         {_mb(mem['parameter_bytes'])} ({mem['dtype']}); adapters "
                 f"{_mb(mem['adapter_parameter_bytes'])}")
    lines.append(f"KV cache           {mem['kv_cache_bytes_per_token']:,} bytes/token ({mem['kv_cache_formula']})")
    if mem.get("kv_cache_bytes_full_context"):
        lines.append(f"                   {_mb(mem['kv_cache_bytes_per_window'])} per eval batch, "
                     f"{_mb(mem['kv_cache_bytes_full_context'])} for the full context")
    lines.append(f"peak               {_mb(mem['peak']['bytes'])} ({mem['peak']['kind']}; {mem['peak']['note']})")
    return "\n".join(lines)


# The report's measured sections in the order they are measured and printed.
SECTION_FORMATTERS = {"perplexity": format_perplexity, "routing_health": format_routing_health,
                      "throughput": format_throughput, "memory": format_memory}


def format_section(name: str, result: Dict) -> str:
    """One measured section, preceded by the blank line that separates it from what came before."""
    return "\n" + SECTION_FORMATTERS[name](result)


def format_report(report: Dict, info: Optional[Dict] = None) -> str:
    """The terminal table of a ``run_full_benchmark`` report: the header, then every section it holds."""
    parts = [format_header(report, info)]
    parts += [format_section(name, report[name]) for name in SECTION_FORMATTERS if report.get(name)]
    return "\n".join(parts)


def _machine(env: dict) -> str:
    return (f"{env.get('platform')}, {os.cpu_count()} CPUs, device {env.get('device')} "
            f"({env.get('gpu', str(env.get('torch_threads')) + ' threads')}), torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}")


def _fmt_bytes(n: Optional[int]) -> str:
    return f"{n / 2**20:,.0f} MiB" if n else "-"


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compare_table(report: dict) -> str:
    rows = report["results"]
    domains = list(rows["base"].get("domains", {}))
    ppl = "test PPL" if not domains else " | ".join(domains) + " | mean PPL (exp mean log)"
    head = f"| model | trainable params | {ppl} | decode tok/s (b=1) | decode ratio | training peak memory | training time |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|"]
    for name, r in rows.items():
        t = (r.get("throughput") or [{}])[0]
        cells = "".join(f"{r['domains'][d]:.3f} | " for d in domains)
        lines.append(f"| {name} | {r['trainable_parameters']:,} | {cells}{r['perplexity']:.3f} | "
                     f"{_number(t.get('decode_tokens_per_s'), '.1f')} | {_number(t.get('decode_ratio'), '.3f')} | "
                     f"{_fmt_bytes(r['training_peak_memory_bytes'])} | "
                     f"{(str(round(r['training_seconds'])) + ' s') if r['training_seconds'] else '-'} |")
    return "\n".join(lines)


def compare_markdown(report: dict, charts: List[str]) -> str:
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
    lines += ["", compare_table(report), ""]
    if "lora" in rows:
        moe, lora = rows["moe"]["perplexity"], rows["lora"]["perplexity"]
        winner = {"moe": "MoE adapters", "lora": "LoRA"}[report["winner_perplexity"]]  # decided once, in compare
        lines.append(f"**Perplexity winner: {winner}** (MoE {moe:.3f} vs LoRA {lora:.3f}, base "
                     f"{rows['base']['perplexity']:.3f}; trainable parameters MoE "
                     f"{rows['moe']['trainable_parameters']:,} vs LoRA {rows['lora']['trainable_parameters']:,}).")
        lines.append("")
    lines.append("Decode ratio: tokens/s of the model divided by the base's, measured in the same run with the "
                 "repeats interleaved. LoRA is measured unmerged; merged, it decodes at the base's speed.")
    lines += ["", routing_table(report.get("expert_usage") or []), ""]
    lines += [f"![{c}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def routing_table(usage: List[Dict[str, object]]) -> str:
    """Per layer: experts, normalised router entropy, smallest and largest expert load and, when the routed
    text had domain labels, the normalised mutual information between domain and chosen expert."""
    if not usage:
        return ""
    with_domains = "domain_expert_nmi" in usage[0]
    lines = ["MoE routing per layer (load: share of the assignments, uniform = 1/E; entropy normalised by log E"
             + ("; NMI: normalised mutual information between domain and chosen expert" if with_domains else "")
             + ")", "", "| layer | experts | entropy | min load | max load |" + (" NMI |" if with_domains else ""),
             "|---:|---:|---:|---:|---:|" + ("---:|" if with_domains else "")]
    for row in usage:
        fractions = row["fractions"]
        lines.append(f"| {row['layer']} | {row['num_experts']} | {row['normalized_entropy']:.3f} | "
                     f"{min(fractions):.3f} | {max(fractions):.3f} |"
                     + (f" {row['domain_expert_nmi']:.3f} |" if with_domains else ""))
    return "\n".join(lines)


def compare_charts(report: dict, out: Path) -> List[str]:
    plt = _matplotlib_pyplot()
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


def save_usage_heatmap(usage: List[Dict[str, object]], path, title: str = "Expert usage") -> Path:
    """A layers x experts heatmap of load fractions (blank where a layer has fewer experts)."""
    import numpy as np

    plt = _matplotlib_pyplot()

    width = max(row["num_experts"] for row in usage)
    grid = np.full((len(usage), width), np.nan)
    for row in usage:
        grid[row["layer"], : row["num_experts"]] = row["fractions"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * width, 1.0 + 0.25 * len(usage)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(width))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of (token, slot) assignments")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_domain_heatmap(usage: List[Dict[str, object]], path, title: str = "Domain x expert usage") -> Path:
    """One small domains x experts heatmap per layer (each domain's share of its assignments per expert),
    titled with the layer's normalised mutual information between domain and expert."""
    import math

    plt = _matplotlib_pyplot()
    columns = min(6, len(usage))
    rows = math.ceil(len(usage) / columns)
    domains = usage[0]["domains"]
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 0.5 + (0.35 * len(domains) + 0.6) * rows),
                             squeeze=False)
    for ax in axes.flat[len(usage):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, usage):
        ax.imshow(row["domain_fractions"], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {row['layer']}  NMI {row['domain_expert_nmi']:.2f}", fontsize=8)
        ax.set_xticks(range(row["num_experts"]))
        ax.tick_params(labelsize=6)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if ax in axes[:, 0] else [], fontsize=7)
    fig.suptitle(f"{title}: each domain's share of its assignments per expert (0 to 1)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_allocation_plot(events: List[Dict[str, object]], path, title: str = "Experts per layer over training") -> Path:
    """Experts per layer (rows) after each allocation change (columns, labelled by step), as a heatmap."""
    plt = _matplotlib_pyplot()
    table = [[int(n) for n in event["experts"]] for event in events]  # [changes][layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(events) + 2), max(3.0, 0.18 * len(table[0]) + 1)))
    image = ax.imshow(list(map(list, zip(*table))), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(events)))
    ax.set_xticklabels([str(event["step"]) for event in events], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (total {sum(table[-1])})")
    fig.colorbar(image, ax=ax, label="experts")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

