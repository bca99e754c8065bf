"""Adapter configurations compared at a matched parameter budget on the three-domain mix (math, code, prose).

Every run: 100 steps x 4 x 256 tokens on the equal-token mix, seed 1, bfloat16 base; selection on the mixture's
validation perplexity (held out from the training files); the first TEST_TOKENS tokens of each domain's test
text in 512-token windows reported beside it. A run is a named configuration at one learning rate:

    python benchmarks/multidomain_sweep.py budget                      # trainable parameters of every config
    python benchmarks/multidomain_sweep.py run lora:1e-3 moe:3e-3      # NAME:LR[:SEED] ..., one after the other
    python benchmarks/multidomain_sweep.py run --jobs 8 --deadline 300 lora:1e-3:1 lora:1e-3:2 ...  # 8 at once
    python benchmarks/multidomain_sweep.py table                       # the table of every finished run
    python benchmarks/multidomain_sweep.py retention lora:1e-3 moe:3e-3   # train on prose only: what is forgotten
    python benchmarks/multidomain_sweep.py retention-mix [--null-distance 1.5]   # each prose-only run + the null
    python benchmarks/multidomain_sweep.py null-validation [--distances 1.5,1.75,2,2.5]   # the null distance, chosen
    python benchmarks/multidomain_sweep.py retention-table             # code and math change against the base
    python benchmarks/multidomain_sweep.py publish docs/results/multidomain-sweep   # summaries + table, committable
    OUT=runs/multidomain-full python benchmarks/multidomain_sweep.py publish docs/results/multidomain-full \\
        --keep aux-free-lr1e-2-seed1,lora-lr3e-3-seed1       # these runs keep their adapters and figures
    MAX_STEPS=2 TEST_TOKENS=512 python benchmarks/multidomain_sweep.py run lora:1e-3    # a smoke run

Environment: DATA (../shared/data), OUT (runs/multidomain-sweep), MAX_STEPS (100), SEQ_LEN (256), SEED (1),
TEST_TOKENS (4096). Every configuration is within 10% of the LoRA baseline's parameters on SmolLM2-135M
(``budget`` checks it).
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama_expert.lifecycle.mix import NULL_DISTANCE

from common import ARCHITECTURES, PROSE, TEST, TRAIN, llama_expert, machine

OUT = Path(os.environ.get("OUT", "runs/multidomain-sweep"))


def even_split(total: int, layers: int) -> str:
    """``total`` experts over ``layers`` layers as evenly as integers allow (5s and 6s for 168 over 30)."""
    return ",".join(str((i + 1) * total // layers - i * total // layers) for i in range(layers))


NOISY = ["--router-type", "noisy_top_k"]  # the seed's router, the default until this study made aux_free the default
LORA_EXPERTS = ["--method", "moe", "--router-type", "aux_free", "--router-aux-loss-coef", "0", "--expert-type",
                "lora_experts", "--num-experts", "4", "--expert-rank", "5", "--expert-allocation", "uniform"]
CONFIGS = {
    "lora": ["--method", "lora", "--lora-r", "4"],
    "lora-2x": ["--method", "lora", "--lora-r", "8"],  # twice the budget: what more parameters alone buy
    "moe": ["--method", "moe", *NOISY],
    "moe-aux0": ["--method", "moe", *NOISY, "--router-aux-loss-coef", "0"],
    "moe-top1": ["--method", "moe", *NOISY, "--top-k", "1"],
    "moe-router10x": ["--method", "moe", *NOISY, "--router-lr-multiplier", "10"],
    "soft": ["--method", "moe", "--router-type", "soft"],
    "switch": ["--method", "moe", "--router-type", "switch", "--top-k", "1"],
    "aux-free": ["--method", "moe", "--router-type", "aux_free", "--router-aux-loss-coef", "0"],
    # the expert-allocation study at progressive's 168 experts over SmolLM2's 30 layers: grown during
    # training from half of it (dynamic), or spread evenly (uniform); "aux-free" itself is progressive
    "aux-free-dynamic": ["--method", "moe", "--router-type", "aux_free", "--router-aux-loss-coef", "0",
                         "--expert-allocation", "dynamic"],
    "aux-free-uniform": ["--method", "moe", "--router-type", "aux_free", "--router-aux-loss-coef", "0",
                         "--expert-allocation", even_split(168, 30)],
    "aux-free-init0": ["--method", "moe", "--router-type", "aux_free", "--router-init-scale", "0"],
    "aux-free-init1": ["--method", "moe", "--router-type", "aux_free", "--router-init-scale", "1"],
    "expert-choice": ["--method", "moe", "--router-type", "expert_choice"],
    "hydra": ["--method", "moe", *NOISY, "--expert-type", "shared_down", "--expert-init", "distinct", "--lora-r", "5"],
    "mixlora": ["--method", "moe", *NOISY, "--expert-type", "mixlora", "--expert-allocation", "uniform",
                "--num-experts", "4", "--lora-r", "1", "--no-router-noise"],
    # experts that own their A_i and B_i (4 of rank 5 per layer: LoRA r=4's size), alone, with a null expert, and
    # balanced over about the last 256 sequences instead of each micro-batch
    "lora-experts": [*LORA_EXPERTS],
    "lora-experts-null": [*LORA_EXPERTS, "--null-expert"],
    "lora-experts-window": [*LORA_EXPERTS, "--balance-window", "256"],
}
# issue 21: three experts a layer, each owning A_i, B_i of rank 7 (1.02x LoRA r=4), one per domain of the mix
THREE = ["--method", "moe", "--expert-type", "lora_experts", "--num-experts", "3", "--expert-allocation", "uniform",
         "--router-aux-loss-coef", "0"]
THREE_BY_7, SHARED_4_THREE_BY_6 = [*THREE, "--expert-rank", "7"], [*THREE, "--expert-rank", "6", "--shared-expert-rank", "4"]
CONFIGS.update({
    "oracle-3x7": [*THREE_BY_7, "--router-type", "oracle", "--oracle-domains", "3"],  # each domain its own expert
    "token-3x7": [*THREE_BY_7, "--router-type", "aux_free", "--top-k", "1"],  # routed per token
    "sequence-3x7": [*THREE_BY_7, "--router-type", "sequence_aux_free", "--top-k", "1"],  # routed by the prefix mean
    "sequence-3x7-null-window": [*THREE_BY_7, "--router-type", "sequence_aux_free", "--top-k", "1", "--null-expert",
                                 "--balance-window", "256"],
    # the same with an always-on shared expert of rank 4 beside three of rank 6 (DeepSeekMoE): what every domain
    # shares learns from all the data; the oracle's is LoRA r=4's size exactly
    "oracle-s4-3x6": [*SHARED_4_THREE_BY_6, "--router-type", "oracle", "--oracle-domains", "3"],
    "sequence-s4-3x6": [*SHARED_4_THREE_BY_6, "--router-type", "sequence_aux_free", "--top-k", "1"],
    "sequence-shared-core": ["--method", "moe", "--router-type", "sequence_aux_free", "--router-aux-loss-coef", "0"],
})
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

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(CONFIGS[name])
    config = dataclass_from_args(ExpertConfig, args)
    if config.expert_allocation == "dynamic":  # its size at the end of growth: the budget, progressive's total
        config.expert_allocation = "progressive"  # (every expert has the same size, wherever it grows)
    method = METHODS.get(args.method).from_expert_config(config)
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


RUN_FOLDER = re.compile(r"^(?P<name>.+)-lr(?P<lr>\d[\d.e+-]*?)(?:-seed(?P<seed>\d+))?$")


def train_command(spec: str, train: str, out: Path):
    """The ``llama-expert train`` command of ``NAME:LR[:SEED]`` (SEED defaults to $SEED, else 1) and its folder."""
    name, lr, *rest = spec.split(":")
    if name not in CONFIGS or not lr or len(rest) > 1:
        sys.exit(f"'{spec}': give NAME:LR[:SEED] with NAME one of {', '.join(CONFIGS)} (e.g. moe:3e-3 or moe:3e-3:2)")
    seed = rest[0] if rest else os.environ.get("SEED", "1")
    folder = out / f"{name}-lr{lr}-seed{seed}"
    model = ["--model", os.environ["MODEL"]] if os.environ.get("MODEL") else []
    return ["llama-expert", "train", *model, *CONFIGS[name], "--learning-rate", lr, "--seed", seed,
            "--output-dir", str(folder), "--dataset", train, "--test-dataset", TEST, "--test-seq-len", "512",
            "--test-max-tokens", os.environ.get("TEST_TOKENS", "4096"),
            "--seq-len", os.environ.get("SEQ_LEN", "256"), "--batch-size", "4",
            "--max-steps", os.environ.get("MAX_STEPS", "100"), "--eval-every", "100000",
            "--eval-max-tokens", "8192", "--dtype", "bfloat16", "--no-progress", "--overwrite"], folder


def run(specs, train: str = TRAIN, out: Path = OUT, jobs: int = 1, deadline: float = math.inf) -> None:
    """Train every spec, ``jobs`` at a time (each job's output in <folder>.log); none is started after
    ``deadline`` seconds. Several jobs share one GPU well: a run of this size is bound by kernel launches."""
    started, running, failed = time.time(), [], []
    queue = [train_command(spec, train, out) for spec in specs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.txt").write_text(machine() + f", {jobs} runs at a time\n")
    while queue or running:
        for process, folder, log in [r for r in running if r[0].poll() is not None]:
            running.remove((process, folder, log))
            log.close()
            print(f"{'done' if process.returncode == 0 else 'FAILED'}: {folder.name} ({time.time() - started:.0f} s)",
                  flush=True)
            if process.returncode:
                failed.append(folder.name)
        while queue and len(running) < jobs:
            if time.time() - started > deadline:
                print(f"deadline: {len(queue)} runs not started: " + ", ".join(f.name for _, f in queue), flush=True)
                queue = []
                break
            command, folder = queue.pop(0)
            print("+", " ".join(command), flush=True)
            log = open(out / f"{folder.name}.log", "w")
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), folder, log))
        time.sleep(1)
    if failed:
        sys.exit(f"{len(failed)} runs failed: {', '.join(failed)} (see their .log files under {out})")


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


def grouped_runs(root: Path) -> dict:
    """{(configuration, learning rate): [(training summary, run folder), ...]} over the finished runs in ``root``,
    one entry per seed."""
    groups = {}
    for path in sorted(root.glob("*-lr*/training_summary.json")):
        match = RUN_FOLDER.match(path.parent.name)
        if match:
            groups.setdefault((match["name"], float(match["lr"])), []).append((json.loads(path.read_text()),
                                                                               path.parent))
    return groups


def mean_std(values, digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def seed_of(folder: Path) -> int:
    return int(RUN_FOLDER.match(folder.name)["seed"] or 1)


def best_rates(validation: dict) -> dict:
    """Per configuration, its learning rate of the lowest mean validation perplexity over the seeds every one of its
    rates was run with (``validation``: (name, lr) -> [(seed, perplexity), ...]). The protocol chooses the rate at
    seed 1 and runs more seeds at that rate alone: one seed's value is never weighed against a mean of more."""
    best = {}
    for name in {name for name, _ in validation}:
        rates = {lr: dict(runs) for (n, lr), runs in validation.items() if n == name}
        shared = set.intersection(*(set(by_seed) for by_seed in rates.values()))
        best[name] = min(rates, key=lambda lr: statistics.mean(
            v for seed, v in rates[lr].items() if seed in shared or not shared))
    return best


def table() -> None:
    """Per configuration and learning rate: mean ± std over the seeds run (std from two seeds on). The best
    learning rate of each configuration is the one with the lowest mean validation perplexity over the seeds all
    its rates share (``best_rates``)."""
    groups = grouped_runs(OUT)
    if not groups:
        sys.exit(f"no */training_summary.json under {OUT}: run some configurations first")
    first = next(iter(groups.values()))[0][0]
    domains = list(first["test"]["after"]["domains"])
    rows = {}
    for key, runs in groups.items():
        summaries = [summary for summary, _ in runs]
        nmis = [n for n in (middle_third_nmi(folder) for _, folder in runs) if n is not None]
        memory = [s["peak_memory"]["bytes"] for s in summaries if s.get("peak_memory")]
        rows[key] = dict(seeds=len(runs), trainable=summaries[0]["trainable_parameters"],
                         validation=[s["final_validation"]["perplexity"] for s in summaries],
                         domains={d: [s["test"]["after"]["domains"][d]["perplexity"] for s in summaries] for d in domains},
                         mean=[s["test"]["after"]["perplexity"] for s in summaries], nmi=nmis,
                         speed=statistics.mean(s["tokens"] / s["seconds"] for s in summaries),
                         memory=max(memory) if memory else None)
    best = best_rates({key: [(seed_of(folder), s["final_validation"]["perplexity"]) for s, folder in runs]
                       for key, runs in groups.items()})
    print(f"| configuration | lr | seeds | trainable | validation | {' | '.join(domains)} | test mean | NMI mid | "
          "tokens/s | peak memory |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|")
    base_cells = " | ".join(f"{first['test']['before']['domains'][d]['perplexity']:.3f}" for d in domains)
    print(f"| base | - | - | 0 | {first['initial_validation']['perplexity']:.3f} | {base_cells} | "
          f"{first['test']['before']['perplexity']:.3f} | - | - | - |")
    for (name, lr), row in sorted(rows.items()):
        mark = " **best lr**" if best[name] == lr and sum(n == name for n, _ in rows) > 1 else ""
        cells = " | ".join(mean_std(row["domains"][d]) for d in domains)
        nmi = mean_std(row["nmi"]) if row["nmi"] else "-"
        memory = f"{row['memory'] / 2 ** 30:.2f} GiB" if row["memory"] else "-"
        print(f"| {name}{mark} | {lr:g} | {row['seeds']} | {row['trainable']:,} | {mean_std(row['validation'])} | "
              f"{cells} | {mean_std(row['mean'])} | {nmi} | {row['speed']:,.0f} | {memory} |")
    ranked = sorted(best.items(), key=lambda item: statistics.mean(rows[item]["validation"]))
    print("\nby best validation perplexity: " + ", ".join(
        f"{name} {statistics.mean(rows[(name, lr)]['validation']):.3f} (lr {lr:g})" for name, lr in ranked))
    if BASELINE in best:
        lora = rows[(BASELINE, best[BASELINE])]["mean"]
        for name, lr in ranked:
            if name == BASELINE:
                continue
            ours = rows[(name, lr)]["mean"]
            ratio = statistics.mean(ours) / statistics.mean(lora)
            spread = (statistics.stdev(ours) + statistics.stdev(lora)) if min(len(ours), len(lora)) > 1 else None
            gap = statistics.mean(lora) - statistics.mean(ours)
            print(f"{name} / {BASELINE} test mean: {ratio:.3f}x" + (
                f" (difference {gap:+.3f}, seeds' std {statistics.stdev(ours):.3f} and {statistics.stdev(lora):.3f})"
                if spread is not None else ""))
    machine = OUT / "machine.txt"
    print(f"machine: {machine.read_text().strip() if machine.exists() else 'not recorded'} (tokens/s are the "
          "wall-clock of each run, with the runs started together sharing the machine)")


MIXED = "retention-mix"  # under OUT: each prose-only run mixed alone with the null expert (``retention-mix``)


def retention_mix(null_distance: float) -> None:
    """Each prose-only run made the one skill of a mix with the null expert (``llama-expert mix --null-expert
    --null-distance D``: zero-shot, routed by the run's own prototypes, no data) and measured by ``llama-expert
    benchmark`` on every domain's test text as the run's own test was (its windows, tokens and dtype): text unlike
    the prose it was trained on should go to the null expert and keep the base model's perplexity (docs/design.md
    section 8). Written to ``mixed_paths``; a run ``mix`` cannot take (an MoE adapter of
    several experts: only LoRAs and one-expert branches mix) is skipped with its reason."""
    runs = sorted(path.parent for path in (OUT / "retention").glob("*-lr*/adapter_model.safetensors"))
    if not runs:
        sys.exit(f"no retention adapters under {OUT / 'retention'}: run `retention NAME:LR[:SEED]` first")
    for run in runs:
        mixed, report = mixed_paths(run.name, null_distance)
        if fresh(report, run):
            print(f"up to date: {report}", flush=True)  # measured after the run's adapter was written
        elif mix_alone(run, mixed, null_distance):
            measure_as_its_run(run, mixed, report)
            print(f"mixed and measured: {mixed}", flush=True)


def mixed_paths(run: str, null_distance: float, under: str = MIXED):
    """(folder, report) of run ``run`` mixed at null distance D: OUT/<under>/<run>-null<D>[.json]. Not
    ``with_suffix``: D may hold a "." (2.5), which it would take for a suffix and replace."""
    name = f"{run}-null{null_distance:g}"
    return OUT / under / name, OUT / under / f"{name}.json"


def mix_alone(run: Path, mixed: Path, null_distance: float) -> bool:
    """``llama-expert mix RUN --null-expert`` into ``mixed``; False, with mix's one-line reason, where it refuses."""
    made = subprocess.run(["llama-expert", "mix", str(run), "--null-expert", "--null-distance", str(null_distance),
                           "--output-dir", str(mixed), "--overwrite"], capture_output=True, text=True)
    if made.returncode:
        print(f"skipped: {run.name}: {(made.stderr.strip().splitlines() or ['mix failed'])[-1]}", flush=True)
    return made.returncode == 0


def measure_as_its_run(run: Path, adapter: Path, report: Path) -> None:
    """``llama-expert benchmark`` of ``adapter`` on the test text of ``run``, with its windows, tokens and dtype."""
    settings = json.loads((run / "training_summary.json").read_text())["settings"]
    llama_expert("benchmark", "--adapter", str(adapter), "--dataset", settings["test_dataset"], "--seq-len",
                 str(settings["test_seq_len"]), "--max-tokens", str(settings["test_max_tokens"]), "--skip-throughput",
                 "--dtype", settings["dtype"], "--no-progress", "--output-json", str(report), "--overwrite", quiet=True)


VALIDATION = "null-validation"  # under OUT: the prose-only LoRAs mixed at each null distance, on validation text


def null_validation(distances) -> None:
    """Choose the null distance on validation text (the held-out 5% of each training file, never the test text):
    each prose-only LoRA run mixed alone with the null expert at every D of ``distances``, the run alone and the base,
    each measured by ``llama-expert benchmark --split validation`` (512-token windows, the first 4,096 tokens of each
    domain, bfloat16; reports under OUT/null-validation, up-to-date ones kept). Prints, per D over the seeds, the
    mean rise of code and math against the base and the prose gain, each as a share of the run's own, and the
    choice: the smallest D that keeps 90% of the prose gain on average (the goal's other half)."""
    runs = sorted(p.parent for p in (OUT / "retention").glob(f"{BASELINE}-lr*/adapter_model.safetensors"))
    if not runs:
        sys.exit(f"no {BASELINE} retention runs under {OUT / 'retention'}: run `retention {BASELINE}:LR:SEED` first")
    folder = OUT / VALIDATION
    model = json.loads((runs[0] / "training_summary.json").read_text())["settings"]["model"]  # the runs' base
    base = validation_report(model, folder / "base.json", base=True)
    rows = {d: [] for d in distances}
    for run in runs:
        alone = validation_report(run, folder / f"{run.name}.json", run)
        for distance in distances:
            mixed, report = mixed_paths(run.name, distance, VALIDATION)
            if not fresh(report, run) and not mix_alone(run, mixed, distance):
                sys.exit(f"{run.name} does not mix: null-validation takes LoRA runs")
            rows[distance].append(shares(validation_report(mixed, report, run), alone, base))
    print(f"null distance on validation text, {len(runs)} run(s): {', '.join(r.name for r in runs)}\n")
    print("| D | math | code | mean rise on code, math | / the run's | prose change | / the run's gain |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for distance, found in rows.items():
        cells = [mean_std([f[key] for f in found], digits) + unit for key, unit, digits in (
            ("math", "%", 1), ("code", "%", 1), ("rise", "%", 1), ("rise_share", "x", 2), ("prose", "%", 1),
            ("gain_share", "%", 1))]
        print(f"| {distance:g} | " + " | ".join(cells) + " |")
    kept = [d for d in sorted(rows) if statistics.mean(f["gain_share"] for f in rows[d]) >= 90]
    print(f"\nchosen: D = {kept[0]:g}" if kept else "\nno distance keeps 90% of the prose gain")


def fresh(report: Path, run: Path) -> bool:
    """``report`` was written after ``run``'s adapter was."""
    return report.exists() and report.stat().st_mtime > (run / "adapter_model.safetensors").stat().st_mtime


def validation_report(adapter, report: Path, run=None, base: bool = False) -> dict:
    """The per-domain perplexities of ``llama-expert benchmark`` of ``adapter`` (``base``: the base model it names)
    on the validation text (the held-out 5% of each training file), measured unless ``report`` is newer than
    ``run``'s adapter (no ``run``: unless it exists)."""
    if not (fresh(report, run) if run is not None else report.exists()):
        report.parent.mkdir(parents=True, exist_ok=True)
        which = ["--model" if base else "--adapter", str(adapter)]
        llama_expert("benchmark", *which, "--split", "validation", "--dataset", TRAIN, "--seq-len", "512",
                     "--max-tokens", "4096", "--skip-throughput", "--dtype", "bfloat16", "--no-progress",
                     "--output-json", str(report), "--overwrite", quiet=True)
    return json.loads(report.read_text())["perplexity"]["domains"]


def shares(mixed: dict, alone: dict, base: dict) -> dict:
    """A mix's changes against the base (%), and its rise and prose gain as shares of the run alone's."""
    change, own = percent_change(mixed, base), percent_change(alone, base)
    prose = next(d for d in change if d.startswith("wikitext"))
    rise = (change["math"] + change["code"]) / 2
    return {"math": change["math"], "code": change["code"], "rise": rise, "prose": change[prose],
            "rise_share": rise / ((own["math"] + own["code"]) / 2), "gain_share": 100 * change[prose] / own[prose]}


def percent_change(after: dict, before: dict) -> dict:
    """{domain: % change of its perplexity}, from two {domain: {"perplexity": ...}} reports."""
    return {d: 100 * (after[d]["perplexity"] / before[d]["perplexity"] - 1) for d in after}


def retention_table() -> None:
    """After training on prose only: each domain's test perplexity change against the base, and the mean rise
    on the domains not trained on (code, math), per configuration and learning rate (mean ± std over seeds);
    the ratio of each mean rise to LoRA's. A run measured by ``retention-mix`` adds a row "+ null D" per null
    distance D: the same adapter as the one skill of a mix with the null expert, against the same base figures."""
    groups = {}
    for (name, lr), runs in grouped_runs(OUT / "retention").items():
        for summary, folder in runs:
            test, row = summary["test"], f"{name}-lr{RUN_FOLDER.match(folder.name)['lr']}"
            groups.setdefault(row, []).append(percent_change(test["after"]["domains"], test["before"]["domains"]))
            for mixed in sorted((OUT / MIXED).glob(f"{folder.name}-null*.json")):
                after = json.loads(mixed.read_text())["perplexity"]["domains"]
                distance = mixed.stem.rsplit("-null", 1)[1]
                groups.setdefault(f"{row} + null {distance}", []).append(percent_change(after, test["before"]["domains"]))
    if not groups:
        sys.exit(f"no retention runs under {OUT / 'retention'}: run `retention NAME:LR[:SEED]` first")
    domains = list(next(iter(groups.values()))[0])
    unseen = [d for d in domains if not d.startswith("wikitext")]
    rises = {name: [sum(c[d] for d in unseen) / len(unseen) for c in changes] for name, changes in groups.items()}
    lora = [statistics.mean(r) for name, r in rises.items() if re.fullmatch(rf"{BASELINE}-lr[^ ]+", name)]
    print(f"| run (trained on prose only) | seeds | {' | '.join(domains)} | mean rise on {', '.join(unseen)} | / LoRA's |")
    print("|---|---:|" + "---:|" * (len(domains) + 2))
    for name, changes in groups.items():
        cells = " | ".join(mean_std([c[d] for c in changes], 1) + "%" for d in domains)
        ratio = f"{statistics.mean(rises[name]) / min(lora):.2f}" if lora and min(lora) > 0 else "-"
        print(f"| {name} | {len(changes)} | {cells} | {mean_std(rises[name], 1)}% | {ratio} |")


def copy(source: Path, target: Path) -> None:
    """``shutil.copy2`` that leaves a file be when it is its own target (``publish`` into OUT itself)."""
    import shutil

    if not target.exists() or not source.samefile(target):
        shutil.copy2(source, target)


def publish(dest: str, keep=()) -> None:
    """Copy every finished run's small result files (summary, expert usage, console log) to ``dest`` and write
    the tables there as README.md, so that the committed tables have their sources. The runs named in
    ``keep`` (folder names, e.g. the headline runs) also keep their adapter, training log and figures. With
    OUT=dest (a published folder that got more runs) only the README is rewritten."""
    import contextlib
    import io

    dest_path = Path(dest)
    summaries = sorted(OUT.glob("*-lr*/training_summary.json")) + sorted(
        (OUT / "retention").glob("*-lr*/training_summary.json"))
    for summary in summaries:
        run = summary.parent
        target = dest_path / run.relative_to(OUT)
        target.mkdir(parents=True, exist_ok=True)
        names = ["training_summary.json", "expert_usage.json"]
        if run.name in keep or run.relative_to(OUT).as_posix() in keep:
            names += ["adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "domain_expert_usage.png",
                      "expert_usage.png", "allocation.png"]
        for name in names:
            if (run / name).exists():
                copy(run / name, target / name)
        if run.with_suffix(".log").exists():
            copy(run.with_suffix(".log"), target.with_suffix(".log"))
    reports = [r for folder in (MIXED, VALIDATION) for pattern in ("*.json", "*/mix_report.json")
               for r in sorted((OUT / folder).glob(pattern))]
    for report in reports:  # retention-mix's and null-validation's benchmark reports, and what each mix was
        target = dest_path / report.relative_to(OUT)
        target.parent.mkdir(parents=True, exist_ok=True)
        copy(report, target)
    for name in ("machine.txt", "retention/machine.txt"):
        if (OUT / name).exists():
            copy(OUT / name, dest_path / name)
    first = json.loads(summaries[0].read_text())
    arguments, settings = first["training_arguments"], first["settings"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        table()
        if (OUT / "retention").exists():
            print("\nRetention (trained on WikiText-2 prose only; change of each domain's test perplexity against the "
                  "base):\n")
            retention_table()
    (dest_path / "README.md").write_text(
        "# Multi-domain sweep\n\n`python benchmarks/multidomain_sweep.py table` (and `retention-table`) "
        f"over the runs in this folder: {arguments['max_steps']} steps x {arguments['batch_size']} x "
        f"{arguments['seq_len']} tokens, base in {settings['dtype']}, test on the first {settings['test_max_tokens']:,} "
        f"tokens of each domain in {settings['test_seq_len']}-token windows; see the script's docstring.\n\n"
        + text.getvalue())
    print(f"published {len(summaries)} runs to {dest_path}")


def main(argv) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["budget", "run", "table", "retention", "retention-mix", "null-validation",
                                            "retention-table",
                                            "publish"])
    parser.add_argument("items", nargs="*", help="NAME:LR[:SEED] for run and retention; a folder for publish")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (run, retention)")
    parser.add_argument("--deadline", type=float, default=math.inf, help="start no run after this many seconds")
    parser.add_argument("--keep", default="", help="publish: comma-separated runs that keep adapter and figures")
    parser.add_argument("--null-distance", type=float, default=NULL_DISTANCE,
                        help="retention-mix: `mix --null-distance` (default: mix's)")
    parser.add_argument("--distances", default="1.5,1.75,2,2.5", help="null-validation: the null distances tried")
    args = parser.parse_intermixed_args(argv)
    if args.command in ("run", "retention"):
        if not args.items:
            sys.exit(f"{args.command}: give at least one NAME:LR[:SEED]")
        train, out = (TRAIN, OUT) if args.command == "run" else (PROSE, OUT / "retention")
        run(args.items, train=train, out=out, jobs=args.jobs, deadline=args.deadline)
    elif args.command == "publish":
        publish(args.items[0] if args.items else "docs/results/multidomain-sweep", keep=args.keep.split(","))
    else:
        {"budget": budget, "table": table, "retention-mix": lambda: retention_mix(args.null_distance),
         "null-validation": lambda: null_validation([float(d) for d in args.distances.split(",")]),
         "retention-table": retention_table}[args.command]()


if __name__ == "__main__":
    main(sys.argv[1:])
