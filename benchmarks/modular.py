"""Skills trained apart and mixed by prototype, against one LoRA trained on the mix (docs/design.md section 8, mix).

Three branches (math, code, prose), each a rank-RANK LoRA expert beside every MLP trained STEPS steps on its own
domain alone, are mixed with no data (`llama-expert mix`, with and without the null expert), and each mix's routers
are then calibrated alone for CALIBRATION_STEPS steps on the mix (`train --init-adapter --train-only router`).
Against them, what a user would do instead, with the same tokens of each domain:
- LoRA r=4 (the same parameters active per token as one branch at RANK 22) and LoRA r=12 (the same total as the
  three) trained 3 x STEPS steps on the equal-token mix;
- LoRA r=4 trained domain after domain (prose, then code, then math; `train --method lora --init-adapter`);
- PEFT's routing over per-domain PEFT LoRAs (r=4, STEPS steps each): Arrow (top-1 and PEFT's default top-3, no
  training) and X-LoRA (its classifier trained CALIBRATION_STEPS steps on the mix); see benchmarks/peft_routing.py.
Every row is measured on the first TEST_TOKENS test tokens of each domain in 512-token windows, bfloat16 base, by
`llama-expert benchmark` (PEFT's routers by the same class, `ExpertModelBenchmark`); the base and the mixes also on
the embedded corpus (Python's documentation prose), text none of the experts was trained on. Then a fourth skill
is added: a branch trained on that corpus, mixed into the mix (`mix mixed branch-docs`); the first three domains
must not move:

    python benchmarks/modular.py run [--jobs 2]   # train what is missing; mix, calibrate, measure what is stale
    python benchmarks/modular.py table            # per-domain perplexity, mean, the specialists' bound, time
    SEED=2 OUT=runs/modular-seed2 python benchmarks/modular.py run --rows seeds   # another seed's repeated rows
    SEED=2 OUT=runs/modular-seed2 python benchmarks/modular.py run --rows lora-library   # ... the LoRA library's
    SEED=2 OUT=runs/modular-seed2 python benchmarks/modular.py run --rows peft-routers   # ... PEFT's routers
    OUT=runs/modular python benchmarks/modular.py run --rows branches   # the branches and their mixes alone
    python benchmarks/modular.py seeds runs/modular runs/modular-seed2 ...          # those rows, mean ± std
    python benchmarks/modular.py mixes runs/modular runs/modular-seed2 ...          # every mix's folder, one a line
    STEPS=2 TEST_TOKENS=512 OUT=runs/modular-smoke python benchmarks/modular.py run   # a smoke run

Environment: DATA (../shared/data), OUT (runs/modular), STEPS (100), CALIBRATION_STEPS (STEPS / 2), LR (3e-3),
SEED (1), RANK (22), SEQ_LEN (256), TEST_TOKENS (4096). `benchmarks/modular.sh` runs both commands.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import DOMAIN_TRAIN, TEST, TRAIN, machine, today

OUT = Path(os.environ.get("OUT", "runs/modular"))
STEPS = int(os.environ.get("STEPS", "100"))
CALIBRATION_STEPS = int(os.environ.get("CALIBRATION_STEPS", str(max(1, STEPS // 2))))  # the routers alone, on the mix
DOMAINS = DOMAIN_TRAIN
TEST_NAMES = ["math", "code", "wikitext-2-raw"]  # the benchmark's domain names of TEST, in DOMAINS' order
UNSEEN = "embedded"  # Python's documentation prose: no branch, no LoRA trained on it
BRANCH = ["--method", "moe", "--expert-type", "lora_experts", "--num-experts", "1", "--top-k", "1",
          "--expert-allocation", "uniform", "--expert-rank", os.environ.get("RANK", "22"), "--router-type", "aux_free",
          "--router-aux-loss-coef", "0"]


def train_command(name: str, method: list, dataset: str, steps: int) -> list:
    """A `train` run of ``method`` (its flags) writing OUT/name; TrainingJob wants a list of such commands."""
    return ["llama-expert", "train", *method, "--dataset", dataset, "--output-dir", str(OUT / name),
            "--learning-rate", os.environ.get("LR", "3e-3"), "--seed", os.environ.get("SEED", "1"),
            "--seq-len", os.environ.get("SEQ_LEN", "256"), "--batch-size", "4", "--max-steps", str(steps),
            "--eval-every", "100000", "--eval-max-tokens", "8192", "--dtype", "bfloat16", "--no-progress",
            "--overwrite"]


LORA4 = ["--method", "lora", "--lora-r", "4"]
SEQUENCE = ["prose", "code", "math"]  # the LoRA trained domain after domain, in this order


def sequential_lora() -> list:
    """LoRA r=4 on prose, then on code from there, then on math: each stage one command, run one after the other."""
    stages, method = [], LORA4
    for domain in SEQUENCE:
        name = f"lora-then-{domain}"
        stages.append(train_command(name, method, DOMAINS[domain], STEPS))
        method = ["--method", "lora", "--init-adapter", str(OUT / name)]  # the rank is the saved LoRA's
    return stages


def trainings() -> dict:
    """Each trained row's name and its commands (several: run in turn); a row is trained when its last run is."""
    runs = {f"branch-{domain}": [train_command(f"branch-{domain}", BRANCH, path, STEPS)]
            for domain, path in DOMAINS.items()}
    runs.update({f"lora-{domain}": [train_command(f"lora-{domain}", LORA4, path, STEPS)]
                 for domain, path in DOMAINS.items()})
    runs["lora-mix-r4"] = [train_command("lora-mix-r4", LORA4, TRAIN, 3 * STEPS)]
    runs["lora-mix-r12"] = [train_command("lora-mix-r12", ["--method", "lora", "--lora-r", "12"], TRAIN, 3 * STEPS)]
    runs[f"lora-then-{SEQUENCE[-1]}"] = sequential_lora()
    runs["branch-docs"] = [train_command("branch-docs", BRANCH, UNSEEN, STEPS)]  # the skill added later
    runs["lora-docs"] = [train_command("lora-docs", LORA4, UNSEEN, STEPS)]  # the same, added to the LoRA library
    return runs


def run_parallel(commands: dict, jobs: int) -> None:
    """Each row's commands (in turn) in their own process, ``jobs`` rows at a time, the output in OUT/<name>.log;
    stop on a failure."""
    queue, running = [(name, " && ".join(shlex.join(c) for c in cs)) for name, cs in commands.items()], []
    while queue or running:
        for name, process, log in [r for r in running if r[1].poll() is not None]:
            running.remove((name, process, log))
            log.close()
            if process.returncode:
                sys.exit(f"{name} failed: see {OUT / (name + '.log')}")
            print(f"done: {name}", flush=True)
        while queue and len(running) < jobs:
            name, command = queue.pop(0)
            print("+", command, flush=True)
            log = open(OUT / f"{name}.log", "w")
            running.append((name, subprocess.Popen(command, shell=True, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1)


def measure(name: str, adapter: list, dataset: str = TEST) -> None:
    subprocess.run(["llama-expert", "benchmark", *adapter, "--dataset", dataset, "--seq-len", "512", "--max-tokens",
                    os.environ.get("TEST_TOKENS", "4096"), "--skip-throughput", "--dtype", "bfloat16",
                    "--routing-windows", "24", "--no-progress", "--output-json", str(OUT / f"{name}.json"),
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    print(f"measured: {name}", flush=True)


def peft_routing(name: str, router: str, *extra: str) -> None:
    """A PEFT router over the per-domain PEFT LoRAs, trained (X-LoRA) and measured by benchmarks/peft_routing.py."""
    loras = [str(OUT / f"lora-{domain}") for domain in DOMAINS]
    subprocess.run([sys.executable, str(Path(__file__).with_name("peft_routing.py")), router, "--adapters", *loras,
                    "--test", TEST, "--test-tokens", os.environ.get("TEST_TOKENS", "4096"), "--seed",
                    os.environ.get("SEED", "1"), "--output-json", str(OUT / f"{name}.json"), *extra], check=True)


def weights(name: str) -> Path:
    return OUT / name / "adapter_model.safetensors"


def stale(output: Path, inputs: list) -> bool:
    """Whether ``output`` is missing or older than one of ``inputs``: as make does, a step is redone only then, so
    an interrupted or extended run redoes only what changed."""
    return not output.exists() or any(output.stat().st_mtime < Path(i).stat().st_mtime for i in inputs)


def mix(name: str, inputs: list, *extra: str) -> None:
    if stale(weights(name), [weights(i) for i in inputs]):
        subprocess.run(["llama-expert", "mix", *(str(OUT / i) for i in inputs), "--output-dir", str(OUT / name),
                        "--overwrite", *extra], check=True)


def measure_adapter(name: str, dataset: str = TEST, prefix: str = "") -> None:
    if stale(OUT / f"{prefix}{name}.json", [weights(name)]):
        measure(f"{prefix}{name}", ["--adapter", str(OUT / name)], dataset)


def mix_names(name: str) -> list:
    """A mix, with the null expert, and each calibrated: the four rows one library of experts gives."""
    return [name, f"{name}-null", f"{name}-calibrated", f"{name}-null-calibrated"]


MIXES = mix_names("mixed")  # the branches mixed
LIBRARY = [f"lora-{domain}" for domain in DOMAINS]  # the per-domain PEFT LoRAs: Arrow's and X-LoRA's library, and ours
LORA_MIXES = mix_names("loras-mixed")  # that library mixed by `llama-expert mix` (experts inside the MLP, mixlora)
ROWS = {"all": None,  # every row
        "seeds": [*(f"branch-{domain}" for domain in DOMAINS), "lora-mix-r4", "lora-mix-r12"],  # repeated over seeds
        "branches": [f"branch-{domain}" for domain in DOMAINS],  # the branches, their mixes, those on unseen text
        "lora-library": [*LIBRARY, "lora-docs"],  # the per-domain LoRAs, their mixes and the skill added to them
        "peft-routers": LIBRARY}  # PEFT's Arrow and X-LoRA over the per-domain LoRAs
ADDED = {"mixed-plus-docs": ["mixed", "branch-docs"],  # a fourth skill mixed into a mix: (the mix, the new skill)
         "loras-mixed-plus-docs": ["loras-mixed", "lora-docs"],
         "loras-mixed-calibrated-plus-docs": ["loras-mixed-calibrated", "lora-docs"]}


def mix_and_calibrate(name: str, inputs: list, jobs: int) -> list:
    """``name`` mixed from ``inputs`` with and without the null expert, each then calibrated: the rows' names."""
    mix(name, inputs)
    mix(f"{name}-null", inputs, "--null-expert")
    calibration = {f"{mixed}-calibrated": [train_command(f"{mixed}-calibrated", [
        "--init-adapter", str(OUT / mixed), "--train-only", "router"], TRAIN, CALIBRATION_STEPS)]
        for mixed in (name, f"{name}-null") if stale(weights(f"{mixed}-calibrated"), [weights(mixed)])}
    run_parallel(calibration, jobs)
    return mix_names(name)


def run(jobs: int, rows: str = "all") -> None:
    """Train what is missing, mix, calibrate and measure what is stale; ``rows`` other than "all": only those
    trainings and their mixes (another SEED's repeated rows in its own OUT, or the LoRA library alone)."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "machine.txt").write_text(f"{machine()}, {jobs} trainings at a time, {today()}\n")
    wanted = {name: c for name, c in trainings().items() if ROWS[rows] is None or name in ROWS[rows]}
    run_parallel({name: c for name, c in wanted.items() if not (OUT / name / "training_summary.json").is_file()}, jobs)
    if rows == "peft-routers":
        return peft_routers()
    mixes = []
    if rows != "lora-library":
        mixes += mix_and_calibrate("mixed", [f"branch-{domain}" for domain in DOMAINS], jobs)
    if rows not in ("seeds", "branches"):
        mixes += mix_and_calibrate("loras-mixed", LIBRARY, jobs)
    for name in [*wanted, *mixes]:
        measure_adapter(name)
    if rows == "branches":  # the branch mixes on text none of the branches saw
        for name in MIXES:
            measure_adapter(name, UNSEEN, prefix="unseen-")
    if rows not in ("seeds", "branches"):  # the LoRA library's mixes on unseen text, then with a fourth skill
        for name in LORA_MIXES:
            measure_adapter(name, UNSEEN, prefix="unseen-")
        add_skill([name for name in ADDED if name.startswith("loras-")])
    if rows == "all":
        measure_the_rest()


def add_skill(names: list) -> None:
    """Each ``ADDED`` row: its mix with the fourth skill mixed in, measured on the three domains and the fourth's text."""
    for name in names:
        mix(name, ADDED[name])
        measure_adapter(name)
        for row in (name, ADDED[name][1]):
            measure_adapter(row, UNSEEN, prefix="unseen-")


def measure_the_rest() -> None:
    """The rows measured once: the base, the fourth skill, text no expert saw, and PEFT's routers."""
    add_skill(["mixed-plus-docs"])
    for name, dataset in (("base", TEST), ("unseen-base", UNSEEN)):
        if not (OUT / f"{name}.json").is_file():
            measure(name, ["--model", "smollm2-135m", "--no-augmented"], dataset)
    for name in [*MIXES, "lora-mix-r4", "branch-docs"]:
        measure_adapter(name, UNSEEN, prefix="unseen-")
    peft_routers()


def peft_routers() -> None:
    """PEFT's Arrow (top-1, top-3) and X-LoRA over the per-domain LoRAs, where stale."""
    loras = [weights(f"lora-{domain}") for domain in DOMAINS]
    for name, router, extra in (("arrow-top1", "arrow", ["--top-k", "1"]), ("arrow-top3", "arrow", ["--top-k", "3"]),
                                ("xlora", "xlora", ["--dataset", TRAIN, "--steps", str(CALIBRATION_STEPS),
                                                    "--learning-rate", os.environ.get("LR", "3e-3")])):
        if stale(OUT / f"{name}.json", loras):
            peft_routing(name, router, *extra)


def perplexities(name: str, folder: Path = OUT) -> dict:
    report = json.loads((folder / f"{name}.json").read_text())["perplexity"]
    return {domain: report["domains"][domain]["perplexity"] for domain in TEST_NAMES} | {"mean": report["perplexity"]}


def mean_of(values: dict) -> float:
    """The benchmark's mean: exp of the mean of the domains' log-perplexities."""
    return math.exp(sum(math.log(values[d]) for d in TEST_NAMES) / len(TEST_NAMES))


PEFT_ROWS = ["arrow-top1", "arrow-top3", "xlora"]  # written by benchmarks/peft_routing.py


def summary_of(name: str) -> dict:
    return json.loads((OUT / name / "training_summary.json").read_text())


def costs() -> dict:
    """Each row's (trainable parameters, training seconds as a table cell): a mix counts its branches, a chain
    its stages, a PEFT router its LoRAs (and X-LoRA its classifier)."""
    cost = {name: (summary_of(name)["trainable_parameters"], f"{summary_of(name)['seconds']:.0f}")
            for name in trainings()}
    branches = sum(summary_of(f"branch-{d}")["seconds"] for d in DOMAINS)
    loras = sum(summary_of(f"lora-{d}")["seconds"] for d in DOMAINS)
    chain = sum(summary_of(f"lora-then-{d}")["seconds"] for d in SEQUENCE)
    cost[f"lora-then-{SEQUENCE[-1]}"] = (cost[f"lora-then-{SEQUENCE[-1]}"][0], f"{chain:.0f} (3 stages)")
    for names, kind, seconds, first in ((["specialists, perfect routing", *MIXES], "branches", branches, "branch-math"),
                                        (["PEFT LoRA specialists, perfect routing", *LORA_MIXES], "LoRAs", loras,
                                         "lora-math")):
        for name in names:
            cost[name] = (3 * summary_of(first)["trainable_parameters"], f"{seconds:.0f} ({kind})"
                          if not name.endswith("-calibrated") else
                          f"{seconds:.0f} + {summary_of(name)['seconds']:.0f} ({kind} + calibration)")
    for name in PEFT_ROWS:
        extra = json.loads((OUT / f"{name}.json").read_text())
        cost[name] = (3 * summary_of("lora-math")["trainable_parameters"] + extra["trainable_parameters"],
                      f"{loras:.0f} + {extra['seconds']:.0f} (LoRAs + classifier)" if extra["seconds"] else
                      f"{loras:.0f} (LoRAs)")
    return cost


def route_share(name: str, folder: Path = OUT) -> float:
    """Share of each domain's test tokens routed to that domain's branch, over the layers and the domains (all
    tokens, the first of each window too: a lower bound of the share after the first 32)."""
    layers = json.loads((folder / f"{name}.json").read_text())["routing_health"]["layers"]
    shares = [layer["domain_fractions"][d][d] for layer in layers for d in range(len(DOMAINS))]
    return 100 * sum(shares) / len(shares)


def route_match(name: str) -> str:
    return f"{route_share(name):.1f}%"


def unseen(name: str, folder: Path = OUT) -> str:
    path = folder / f"unseen-{name}.json"
    return f"{json.loads(path.read_text())['perplexity']['perplexity']:.3f}" if path.is_file() else "-"


def fourth_skill(folder: Path = OUT) -> None:
    """The three domains and the added one, before and after the fourth skill joins each mix that has one."""
    print(f"\n| adding a fourth skill | {' | '.join(TEST_NAMES)} | {UNSEEN} |")
    print("|---|" + "---:|" * (len(TEST_NAMES) + 1))
    for name in present(list(ADDED), folder):
        mixed, skill = ADDED[name]
        for row in (mixed, name):
            cells = " | ".join(f"{perplexities(row, folder)[d]:.3f}" for d in TEST_NAMES)
            print(f"| {row} | {cells} | {unseen(row, folder)} |")
        print(f"| change | {' | '.join(f'{c:+.2f}%' for c in skill_change(name, folder))} | {skill} alone: "
              f"{unseen(skill, folder)} |")


def skill_change(name: str, folder: Path = OUT) -> list:
    """Each domain's perplexity change (%) when the fourth skill joins the mix: ``ADDED`` row against its mix."""
    before, after = perplexities(ADDED[name][0], folder), perplexities(name, folder)
    return [100 * (after[d] / before[d] - 1) for d in TEST_NAMES]


def present(names: list, folder: Path = OUT) -> list:
    return [name for name in names if (folder / f"{name}.json").is_file()]


def bounds(folder: Path = OUT) -> dict:
    """Each library's specialists with perfect routing: each domain's perplexity from its own specialist."""
    found = {}
    for label, prefix in (("specialists, perfect routing", "branch"),
                          ("PEFT LoRA specialists, perfect routing", "lora")):
        if all((folder / f"{prefix}-{d}.json").is_file() for d in DOMAINS):
            bound = {test: perplexities(f"{prefix}-{d}", folder)[test] for d, test in zip(DOMAINS, TEST_NAMES)}
            found[label] = bound | {"mean": mean_of(bound)}
    return found


def table() -> None:
    names = ["base", *trainings(), *MIXES, *present(LORA_MIXES), *PEFT_ROWS]
    rows = {name: perplexities(name) for name in names}
    rows.update(bounds())
    cost, lora = costs(), rows["lora-mix-r4"]["mean"]
    print(f"| row | trainable | training s | {' | '.join(TEST_NAMES)} | mean | / LoRA r=4 on the mix | route = "
          f"domain | unseen text ({UNSEEN}) |")
    print("|---|---:|---:|" + "---:|" * (len(TEST_NAMES) + 4))
    for name, values in rows.items():
        trained, time_cell = cost.get(name, (0, "-"))
        cells = " | ".join(f"{values[d]:.3f}" for d in TEST_NAMES)
        match = route_match(name) if name in MIXES + LORA_MIXES else "-"
        print(f"| {name} | {trained:,} | {time_cell} | {cells} | {values['mean']:.3f} | {values['mean'] / lora:.3f} "
              f"| {match} | {unseen(name)} |")
    print(f"\nmachine: {(OUT / 'machine.txt').read_text().strip()}; {STEPS} steps per branch and per-domain LoRA, "
          f"{3 * STEPS} for LoRA on the mix, {CALIBRATION_STEPS} for each calibration and X-LoRA's classifier")
    fourth_skill()


def mean_std(values: list) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def seeds_table(folders: list) -> None:
    """The rows repeated over seeds (one folder a seed, each an OUT of `run`, or of `run --rows seeds` and `--rows
    lora-library`): per-domain perplexity, mean and its ratio to LoRA r=4 on the mix of the same seed, mean ± std
    over the seeds that hold the row."""
    folders = [Path(f) for f in folders]
    rows = {}
    for folder in folders:
        found = bounds(folder) | {name: perplexities(name, folder)
                                  for name in present([*MIXES, *LORA_MIXES, "lora-mix-r4", "lora-mix-r12", *PEFT_ROWS],
                                                      folder)}
        lora = perplexities("lora-mix-r4", folder)["mean"] if (folder / "lora-mix-r4.json").is_file() else None
        for name, values in found.items():
            rows.setdefault(name, []).append((values, lora, folder))
    print(f"| row | seeds | {' | '.join(TEST_NAMES)} | mean | / LoRA r=4 on the mix | route = domain |")
    print("|---|---:|" + "---:|" * (len(TEST_NAMES) + 3))
    for name, runs in rows.items():
        cells = " | ".join(mean_std([v[d] for v, _, _ in runs]) for d in TEST_NAMES)
        paired = [v["mean"] / lora for v, lora, _ in runs if lora]
        ratio = mean_std(paired) if len(paired) == len(runs) else "-"
        match = mean_std([route_share(name, f) for _, _, f in runs]) + "%" if name in MIXES + LORA_MIXES else "-"
        print(f"| {name} | {len(runs)} | {cells} | {mean_std([v['mean'] for v, _, _ in runs])} | {ratio} | {match} |")
    added = {name: [skill_change(name, f) for f in folders] for name in ADDED
             if all(present([name], f) for f in folders)}
    if added:
        print(f"\n| fourth skill added | seeds | {' | '.join(TEST_NAMES)} (change) |")
        print("|---|---:|" + "---:|" * len(TEST_NAMES))
        for name, changes in added.items():
            cells = " | ".join(mean_std([c[i] for c in changes]) + "%" for i in range(len(TEST_NAMES)))
            print(f"| {' + '.join(ADDED[name])} | {len(changes)} | {cells} |")
    print("\nfolders: " + ", ".join(f"{f} ({(f / 'machine.txt').read_text().strip()})" for f in folders))


def main(argv) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "table", "seeds", "mixes"])
    parser.add_argument("folders", nargs="*", help="seeds, mixes: one OUT folder a seed")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "1")), help="trainings at a time")
    parser.add_argument("--rows", choices=list(ROWS), default="all", help="run: every row, only the rows repeated over "
                        "seeds (another SEED, its own OUT), only the branches and their mixes, only the per-domain "
                        "LoRAs and their mixes, or only PEFT's routers over those LoRAs")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.jobs, args.rows)
    elif args.command == "table":
        table()
    elif args.command == "mixes":  # for benchmarks/route_after_prefix.py (modular.sh)
        print("\n".join(str(Path(folder) / name) for folder in args.folders for name in [*MIXES, *LORA_MIXES]))
    else:
        seeds_table(args.folders)


if __name__ == "__main__":
    main(sys.argv[1:])
