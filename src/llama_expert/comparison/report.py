"""compare's report: the terminal table, the Markdown report with its routing table, and the bar charts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from ..metrics.plots import bar_chart

COLORS = {"base": "#888888", "moe": "#2a7ab9", "lora": "#d9822b"}


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
        fractions = row["fractions"][:row["num_experts"]]  # the experts (a null expert's share comes after them)
        lines.append(f"| {row['layer']} | {row['num_experts']} | {row['normalized_entropy']:.3f} | "
                     f"{min(fractions):.3f} | {max(fractions):.3f} |"
                     + (f" {row['domain_expert_nmi']:.3f} |" if with_domains else ""))
    return "\n".join(lines)


def compare_charts(report: dict, out: Path) -> List[str]:
    """perplexity.png, throughput.png (decode ratio) and memory.png (peak training memory) where measured."""
    rows = report["results"]
    names = list(rows)
    made = []

    def bar(filename, labels, values, title, ylabel, fmt):
        bar_chart(out / filename, labels, values, title, ylabel, fmt, COLORS)
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
