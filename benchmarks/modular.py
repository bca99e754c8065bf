"""Skills trained apart and mixed by prototype, against one LoRA trained on the mix (docs/design.md section 8, mix).

Three branches (math, code, prose), each a rank-RANK LoRA expert beside every MLP trained STEPS steps on its own
domain alone, are mixed with no data (`llama-expert mix`, with and without the null expert), and each mix's routers
are then calibrated alone for CALIBRATION_STEPS steps on the mix (`train --init-adapter --train-only router`).
LoRA r=4 (the same parameters active per token as one branch at RANK 22) and LoRA r=12 (the same total as the
three) train 3 x STEPS steps on the equal-token mix: the same tokens of each domain as the branches. Every row is
measured by one command, `llama-expert benchmark` on the first TEST_TOKENS test tokens of each domain in 512-token
windows, bfloat16 base:

    python benchmarks/modular.py run [--jobs 2]   # train what is missing; mix, calibrate, measure (redone each run)
    python benchmarks/modular.py table            # per-domain perplexity, mean, the specialists' bound, time
    STEPS=2 TEST_TOKENS=512 OUT=runs/modular-smoke python benchmarks/modular.py run   # a smoke run

Environment: DATA (../shared/data), OUT (runs/modular), STEPS (100), CALIBRATION_STEPS (STEPS / 2), LR (3e-3),
SEED (1), RANK (22), SEQ_LEN (256), TEST_TOKENS (4096). `benchmarks/modular.sh` runs both commands.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DOMAIN_TRAIN, TEST, TRAIN, machine, today

OUT = Path(os.environ.get("OUT", "runs/modular"))
STEPS = int(os.environ.get("STEPS", "100"))
CALIBRATION_STEPS = int(os.environ.get("CALIBRATION_STEPS", str(max(1, STEPS // 2))))  # the routers alone, on the mix
MIXES = ["mixed", "mixed-null", "mixed-calibrated", "mixed-null-calibrated"]
DOMAINS = DOMAIN_TRAIN
TEST_NAMES = ["math", "code", "wikitext-2-raw"]  # the benchmark's domain names of TEST, in DOMAINS' order
BRANCH = ["--method", "moe", "--expert-type", "lora_experts", "--num-experts", "1", "--top-k", "1",
          "--expert-allocation", "uniform", "--expert-rank", os.environ.get("RANK", "22"), "--router-type", "aux_free",
          "--router-aux-loss-coef", "0"]


def train_command(name: str, method: list, dataset: str, steps: int) -> list:
    return ["llama-expert", "train", *method, "--dataset", dataset, "--output-dir", str(OUT / name),
            "--learning-rate", os.environ.get("LR", "3e-3"), "--seed", os.environ.get("SEED", "1"),
            "--seq-len", os.environ.get("SEQ_LEN", "256"), "--batch-size", "4", "--max-steps", str(steps),
            "--eval-every", "100000", "--eval-max-tokens", "8192", "--dtype", "bfloat16", "--no-progress",
            "--overwrite"]


def trainings() -> dict:
    runs = {f"branch-{domain}": train_command(f"branch-{domain}", BRANCH, path, STEPS)
            for domain, path in DOMAINS.items()}
    runs["lora-mix-r4"] = train_command("lora-mix-r4", ["--method", "lora", "--lora-r", "4"], TRAIN, 3 * STEPS)
    runs["lora-mix-r12"] = train_command("lora-mix-r12", ["--method", "lora", "--lora-r", "12"], TRAIN, 3 * STEPS)
    return runs


def run_parallel(commands: dict, jobs: int) -> None:
    """Each command in its own process, ``jobs`` at a time, its output in OUT/<name>.log; stop on a failure."""
    queue, running = list(commands.items()), []
    while queue or running:
        for name, process, log in [r for r in running if r[1].poll() is not None]:
            running.remove((name, process, log))
            log.close()
            if process.returncode:
                sys.exit(f"{name} failed: see {OUT / (name + '.log')}")
            print(f"done: {name}", flush=True)
        while queue and len(running) < jobs:
            name, command = queue.pop(0)
            print("+", " ".join(command), flush=True)
            log = open(OUT / f"{name}.log", "w")
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1)


def measure(name: str, adapter: list) -> None:
    subprocess.run(["llama-expert", "benchmark", *adapter, "--dataset", TEST, "--seq-len", "512", "--max-tokens",
                    os.environ.get("TEST_TOKENS", "4096"), "--skip-throughput", "--dtype", "bfloat16",
                    "--routing-windows", "24", "--no-progress", "--output-json", str(OUT / f"{name}.json"),
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    print(f"measured: {name}", flush=True)


def run(jobs: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "machine.txt").write_text(f"{machine()}, {jobs} trainings at a time, {today()}\n")
    missing = {name: c for name, c in trainings().items() if not (OUT / name / "training_summary.json").is_file()}
    run_parallel(missing, jobs)
    branches = [str(OUT / f"branch-{domain}") for domain in DOMAINS]
    for name, extra in (("mixed", []), ("mixed-null", ["--null-expert"])):
        subprocess.run(["llama-expert", "mix", *branches, "--output-dir", str(OUT / name), "--overwrite", *extra],
                       check=True)
    calibration = {f"{name}-calibrated": train_command(f"{name}-calibrated", [
        "--init-adapter", str(OUT / name), "--train-only", "router"], TRAIN, CALIBRATION_STEPS)
        for name in ("mixed", "mixed-null")}
    run_parallel(calibration, jobs)
    measure("base", ["--model", "smollm2-135m", "--no-augmented"])
    for name in [*trainings(), *MIXES]:
        measure(name, ["--adapter", str(OUT / name)])


def perplexities(name: str) -> dict:
    report = json.loads((OUT / f"{name}.json").read_text())["perplexity"]
    return {domain: report["domains"][domain]["perplexity"] for domain in TEST_NAMES} | {"mean": report["perplexity"]}


def mean_of(values: dict) -> float:
    """The benchmark's mean: exp of the mean of the domains' log-perplexities."""
    return math.exp(sum(math.log(values[d]) for d in TEST_NAMES) / len(TEST_NAMES))


def table() -> None:
    rows = {name: perplexities(name) for name in ["base", *trainings(), *MIXES]}
    bound = {test: rows[f"branch-{domain}"][test] for domain, test in zip(DOMAINS, TEST_NAMES)}
    rows["specialists, perfect routing"] = bound | {"mean": mean_of(bound)}
    seconds = {name: json.loads((OUT / name / "training_summary.json").read_text())["seconds"]
               for name in [*trainings(), *(m for m in MIXES if m.endswith("-calibrated"))]}
    branches = sum(seconds[f"branch-{d}"] for d in DOMAINS)
    parameters = {name: json.loads((OUT / name / "training_summary.json").read_text())["trainable_parameters"]
                  for name in trainings()}
    lora = rows["lora-mix-r4"]["mean"]
    print(f"| row | trainable | training s | {' | '.join(TEST_NAMES)} | mean | / LoRA r=4 on the mix |")
    print("|---|---:|---:|" + "---:|" * (len(TEST_NAMES) + 2))
    for name, values in rows.items():
        trained = parameters.get(name, 3 * parameters["branch-math"] if name.startswith(("mixed", "special")) else 0)
        time_cell = (f"{branches:.0f} + {seconds[name]:.0f} (branches + calibration)" if name.endswith("-calibrated")
                     else f"{seconds[name]:.0f}" if name in seconds
                     else f"{branches:.0f} (branches)" if name.startswith("mixed") else "-")
        cells = " | ".join(f"{values[d]:.3f}" for d in TEST_NAMES)
        print(f"| {name} | {trained:,} | {time_cell} | {cells} | {values['mean']:.3f} | {values['mean'] / lora:.3f} |")
    print(f"\nmachine: {(OUT / 'machine.txt').read_text().strip()}; {STEPS} steps per branch, {3 * STEPS} for LoRA")


def main(argv) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "1")), help="trainings at a time")
    args = parser.parse_args(argv)
    run(args.jobs) if args.command == "run" else table()


if __name__ == "__main__":
    main(sys.argv[1:])
