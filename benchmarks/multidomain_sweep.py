"""The cheap sweep of issue 9 section 2 on the three-domain mix (math, code, prose).

Every run: 100 steps x 4 x 256 tokens on the equal-token mix, seed 1, bfloat16 base; selection on the mixture's
validation perplexity (held out from the training files); the first TEST_TOKENS tokens of each domain's test
text in 512-token windows reported beside it. A run is a named configuration at one learning rate:

    python benchmarks/multidomain_sweep.py budget                      # trainable parameters of every config
    python benchmarks/multidomain_sweep.py run lora:1e-3 moe:3e-3      # NAME:LR ..., one after the other
    python benchmarks/multidomain_sweep.py table                       # the table of every finished run
    python benchmarks/multidomain_sweep.py retention lora:1e-3 moe:3e-3   # train on prose only (section 4)
    python benchmarks/multidomain_sweep.py retention-table             # code and math change against the base
    python benchmarks/multidomain_sweep.py publish docs/results/multidomain-sweep   # summaries + table, committable
    MAX_STEPS=2 TEST_TOKENS=512 python benchmarks/multidomain_sweep.py run lora:1e-3    # a smoke run

Environment: DATA (../shared/data), OUT (runs/multidomain-sweep), MAX_STEPS (100), SEQ_LEN (256), SEED (1),
TEST_TOKENS (4096). Every configuration is within 10% of the LoRA baseline's parameters on SmolLM2-135M
(``budget`` checks it).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

DATA = os.environ.get("DATA", "../shared/data")
OUT = Path(os.environ.get("OUT", "runs/multidomain-sweep"))
TRAIN = ",".join(f"{DATA}/{p}" for p in ("multidomain/math/train.jsonl", "multidomain/code/train.txt",
                                          "wikitext-2-raw/wiki.valid.raw"))
PROSE = f"{DATA}/wikitext-2-raw/wiki.valid.raw"
TEST = ",".join(f"{DATA}/{p}" for p in ("multidomain/math/test.jsonl", "multidomain/code/test.txt",
                                         "wikitext-2-raw/wiki.test.raw"))

CONFIGS = {
    "lora": ["--method", "lora", "--lora-r", "4"],
    "moe": ["--method", "moe"],
    "moe-aux0": ["--method", "moe", "--router-aux-loss-coef", "0"],
    "moe-top1": ["--method", "moe", "--top-k", "1"],
    "moe-router10x": ["--method", "moe", "--router-lr-multiplier", "10"],
    "soft": ["--method", "moe", "--router-type", "soft"],
    "switch": ["--method", "moe", "--router-type", "switch", "--top-k", "1"],
    "aux-free": ["--method", "moe", "--router-type", "aux_free", "--router-aux-loss-coef", "0"],
    "expert-choice": ["--method", "moe", "--router-type", "expert_choice"],
    "hydra": ["--method", "moe", "--expert-type", "shared_down", "--expert-init", "distinct", "--lora-r", "5"],
    "mixlora": ["--method", "moe", "--expert-type", "mixlora", "--expert-allocation", "uniform",
                "--num-experts", "4", "--lora-r", "1", "--no-router-noise"],
}
BASELINE = "lora"


def trainable_parameters(name: str) -> int:
    """Trainable parameters of configuration ``name`` on SmolLM2-135M, built on the meta device."""
    import argparse

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_expert.cli.arguments import dataclass_from_args
    from llama_expert.cli.train import add_arguments
    from llama_expert.config import ExpertConfig
    from llama_expert.training.methods import METHODS

    sys.path.insert(0, str(Path(__file__).parent))
    from parameter_budget import ARCHITECTURES

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(CONFIGS[name])
    method = METHODS.get(args.method).from_expert_config(dataclass_from_args(ExpertConfig, args))
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURES["SmolLM2-135M"]))
    model = method.add_to(model) or model
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def budget() -> None:
    counts = {name: trainable_parameters(name) for name in CONFIGS}
    print("| configuration | arguments | trainable | / LoRA |")
    print("|---|---|---:|---:|")
    for name, count in counts.items():
        ratio = count / counts[BASELINE]
        flag = "" if abs(ratio - 1) <= 0.10 else " (outside 10%)"
        print(f"| {name} | `{' '.join(CONFIGS[name])}` | {count:,} | {ratio:.3f}{flag} |")


def run(specs, train: str = TRAIN, out: Path = OUT) -> None:
    for spec in specs:
        name, _, lr = spec.partition(":")
        if name not in CONFIGS or not lr:
            sys.exit(f"'{spec}': give NAME:LR with NAME one of {', '.join(CONFIGS)} (e.g. moe:3e-3)")
        command = ["llama-expert", "train", *CONFIGS[name], "--learning-rate", lr,
                   "--seed", os.environ.get("SEED", "1"), "--output-dir", str(out / f"{name}-lr{lr}"),
                   "--dataset", train, "--test-dataset", TEST, "--test-seq-len", "512",
                   "--test-max-tokens", os.environ.get("TEST_TOKENS", "4096"),
                   "--seq-len", os.environ.get("SEQ_LEN", "256"), "--batch-size", "4",
                   "--max-steps", os.environ.get("MAX_STEPS", "100"), "--eval-every", "100000",
                   "--eval-max-tokens", "8192", "--dtype", "bfloat16", "--no-progress", "--overwrite"]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def middle_third_nmi(folder: Path):
    """Mean normalised mutual information (domain; expert) over the middle third of the layers, if measured."""
    path = folder / "expert_usage.json"
    if not path.exists():
        return None
    layers = [row["domain_expert_nmi"] for row in json.loads(path.read_text()) if "domain_expert_nmi" in row]
    if not layers:
        return None
    third = len(layers) // 3
    middle = layers[third:len(layers) - third]
    return sum(middle) / len(middle)


def table() -> None:
    rows = []
    for path in sorted(OUT.glob("*-lr*/training_summary.json")):
        summary = json.loads(path.read_text())
        name, _, lr = path.parent.name.rpartition("-lr")
        after = summary["test"]["after"]
        rows.append((name, float(lr), summary["trainable_parameters"], summary["final_validation"]["perplexity"],
                     after["domains"], after["perplexity"], summary["tokens"] / summary["seconds"],
                     middle_third_nmi(path.parent), summary))
    if not rows:
        sys.exit(f"no */training_summary.json under {OUT}: run some configurations first")
    domains = list(rows[0][4])
    best = {}
    for row in rows:
        if row[0] not in best or row[3] < best[row[0]][3]:
            best[row[0]] = row
    before = rows[0][8]["test"]["before"]
    print(f"| configuration | lr | trainable | validation | {' | '.join(domains)} | test mean | NMI mid | tokens/s |")
    print("|---|---:|---:|---:|" + "---:|" * len(domains) + "---:|---:|---:|")
    base_cells = " | ".join(f"{before['domains'][d]['perplexity']:.3f}" for d in domains)
    print(f"| base | - | 0 | {rows[0][8]['initial_validation']['perplexity']:.3f} | {base_cells} | "
          f"{before['perplexity']:.3f} | - | - |")
    for name, lr, trainable, validation, per_domain, mean, speed, nmi, _ in sorted(rows, key=lambda r: (r[0], r[1])):
        mark = " **best lr**" if best[name][1] == lr and sum(r[0] == name for r in rows) > 1 else ""
        cells = " | ".join(f"{per_domain[d]['perplexity']:.3f}" for d in domains)
        print(f"| {name}{mark} | {lr:g} | {trainable:,} | {validation:.3f} | {cells} | {mean:.3f} | "
              f"{'-' if nmi is None else f'{nmi:.3f}'} | {speed:,.0f} |")
    ranked = sorted(best.values(), key=lambda r: r[3])
    print("\nby best validation perplexity: " + ", ".join(f"{r[0]} {r[3]:.3f} (lr {r[1]:g})" for r in ranked))
    if math.isfinite(ranked[0][3]):
        print(f"machine: {os.uname().machine}, {os.cpu_count()} CPUs (tokens/s are wall-clock of each run)")


def retention_table() -> None:
    """After training on prose only: each domain's test perplexity change against the base, and the mean rise
    on the domains not trained on (code, math), per configuration; the ratio to LoRA's rise."""
    rows = {}
    for path in sorted((OUT / "retention").glob("*-lr*/training_summary.json")):
        test = json.loads(path.read_text())["test"]
        change = {d: 100 * (test["after"]["domains"][d]["perplexity"] / test["before"]["domains"][d]["perplexity"] - 1)
                  for d in test["after"]["domains"]}
        rows[path.parent.name] = change
    if not rows:
        sys.exit(f"no retention runs under {OUT / 'retention'}: run `retention NAME:LR` first")
    domains = list(next(iter(rows.values())))
    unseen = [d for d in domains if not d.startswith("wikitext")]
    lora = [change for name, change in rows.items() if name.startswith(BASELINE + "-")]
    lora_rise = sum(lora[0][d] for d in unseen) / len(unseen) if lora else None
    print(f"| run (trained on prose only) | {' | '.join(domains)} | mean rise on {', '.join(unseen)} | / LoRA's |")
    print("|---|" + "---:|" * (len(domains) + 2))
    for name, change in rows.items():
        rise = sum(change[d] for d in unseen) / len(unseen)
        ratio = f"{rise / lora_rise:.2f}" if lora_rise else "-"
        print(f"| {name} | {' | '.join(f'{change[d]:+.1f}%' for d in domains)} | {rise:+.1f}% | {ratio} |")


def publish(dest: str) -> None:
    """Copy every finished run's small result files (summary, expert usage and its figures; not the adapter
    weights) to ``dest`` and write the table there as README.md, so that the committed table has its sources."""
    import contextlib
    import io
    import shutil

    dest_path = Path(dest)
    for summary in sorted(OUT.glob("*-lr*/training_summary.json")) + sorted(
            (OUT / "retention").glob("*-lr*/training_summary.json")):
        run = summary.parent
        target = dest_path / run.relative_to(OUT)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("training_summary.json", "expert_usage.json", "domain_expert_usage.png", "train_log.jsonl"):
            if (run / name).exists():
                shutil.copy2(run / name, target / name)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        table()
    (dest_path / "README.md").write_text(
        "# Multi-domain sweep (issue 9)\n\n`python benchmarks/multidomain_sweep.py table` over the runs in this "
        "folder (100 steps x 4 x 256 tokens, seed 1, bfloat16 base; see the script's docstring).\n\n"
        + text.getvalue())
    print(f"published {len(list(dest_path.glob('*/training_summary.json')))} runs to {dest_path}")


def main(argv) -> None:
    commands = {"budget": lambda: budget(), "run": lambda: run(argv[1:]), "table": lambda: table(),
                "retention": lambda: run(argv[1:], train=PROSE, out=OUT / "retention"),
                "retention-table": lambda: retention_table(),
                "publish": lambda: publish(argv[1] if len(argv) > 1 else "docs/results/multidomain-sweep")}
    if not argv or argv[0] not in commands:
        sys.exit(__doc__)
    commands[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
