"""The multi-domain table from the training summaries of benchmarks/multidomain.sh: per method, the test
perplexity of each domain and the exp of their mean log-perplexity, mean +- std over seeds (std needs two
or more seeds), trainable parameters, training tokens/s and peak memory.

    python benchmarks/multidomain_table.py docs/results/multidomain
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(root: str) -> None:
    runs = defaultdict(list)
    for summary_path in sorted(Path(root).glob("*-seed*/training_summary.json")):
        runs[summary_path.parent.name.rsplit("-seed", 1)[0]].append(json.loads(summary_path.read_text()))
    if not runs:
        sys.exit(f"no */training_summary.json under {root}: run benchmarks/multidomain.sh first")
    first = next(iter(runs.values()))[0]["test"]
    domains = list(first["after"]["domains"])
    print(f"| method | seeds | trainable | {' | '.join(domains)} | mean (exp mean log) | tokens/s | peak memory |")
    print("|---|---:|---:|" + "---:|" * len(domains) + "---:|---:|---:|")
    base = {d: first["before"]["domains"][d]["perplexity"] for d in domains}
    print(f"| base | - | 0 | {' | '.join(f'{base[d]:.3f}' for d in domains)} | "
          f"{first['before']['perplexity']:.3f} | - | - |")
    for method, summaries in runs.items():
        cells = [mean_std([s["test"]["after"]["domains"][d]["perplexity"] for s in summaries]) for d in domains]
        mean = mean_std([s["test"]["after"]["perplexity"] for s in summaries])
        speed = statistics.mean(s["tokens"] / s["seconds"] for s in summaries)
        memory = max(s["peak_memory"]["bytes"] for s in summaries) / 2 ** 20
        print(f"| {method} | {len(summaries)} | {summaries[0]['trainable_parameters']:,} | {' | '.join(cells)} | "
              f"{mean} | {speed:,.0f} | {memory:,.0f} MiB |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/multidomain")
