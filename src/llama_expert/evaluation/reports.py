"""The benchmark's terminal table: one formatter per section, so that ``benchmark`` prints each section as soon as
it is measured and the sections together are ``format_report``'s table."""

from __future__ import annotations

from typing import Dict, Optional


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
