"""benchmarks/modular.py's tables compute what they print: the specialists-with-perfect-routing bound is the exp of
the mean log-perplexity of each domain's own specialist (a bound once added by hand came out wrong), and the seeds
table gives mean ± sample std over the seeds that hold a row, each seed's ratio to its own LoRA on the mix."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = {"math": "math", "code": "code", "prose": "wikitext-2-raw"}


def _report(folder: Path, name: str, values: dict, routed: float = 0.9) -> None:
    """A `benchmark --output-json` file as modular.py reads it: per-domain perplexity, the mean, the routing."""
    mean = math.exp(sum(math.log(v) for v in values.values()) / len(values))
    share = [[routed if i == j else (1 - routed) / 2 for j in range(3)] for i in range(3)]
    (folder / f"{name}.json").write_text(json.dumps({
        "perplexity": {"perplexity": mean, "domains": {d: {"perplexity": v} for d, v in values.items()}},
        "routing_health": {"layers": [{"domain_fractions": share}] * 2}}))


def _seed(folder: Path, shift: float) -> None:
    folder.mkdir()
    (folder / "machine.txt").write_text("test machine\n")
    for prefix, base in (("branch", 4.0), ("lora", 3.0)):
        for i, domain in enumerate(DOMAINS):
            values = {test: base * 10 if test == DOMAINS[domain] else 50.0 for test in DOMAINS.values()}
            values[DOMAINS[domain]] = base + i + shift
            _report(folder, f"{prefix}-{domain}", values)
    _report(folder, "lora-mix-r4", {"math": 4.0, "code": 5.0, "wikitext-2-raw": 6.0})
    _report(folder, "mixed", {"math": 5.0, "code": 6.0, "wikitext-2-raw": 7.0 + shift}, routed=0.9 + shift / 10)


def _seeds_table(*folders) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "modular.py"), "seeds", *map(str, folders)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


def test_the_seeds_table_computes_bounds_means_and_spreads(tmp_path):
    _seed(tmp_path / "1", 0.0)
    _seed(tmp_path / "2", 1.0)
    rows = _seeds_table(tmp_path / "1", tmp_path / "2")
    bound = [math.exp((math.log(4 + s) + math.log(5 + s) + math.log(6 + s)) / 3) for s in (0.0, 1.0)]
    mean = sum(bound) / 2
    std = math.sqrt(sum((b - mean) ** 2 for b in bound))  # n - 1 = 1
    assert rows["specialists, perfect routing"][0] == "2"
    assert rows["specialists, perfect routing"][4] == f"{mean:.3f} ± {std:.3f}"
    assert rows["specialists, perfect routing"][1] == "4.500 ± 0.707"  # math: 4 and 5
    lora = math.exp((math.log(4) + math.log(5) + math.log(6)) / 3)
    ratios = [math.exp((math.log(5) + math.log(6) + math.log(7 + s)) / 3) / lora for s in (0.0, 1.0)]
    assert rows["mixed"][5] == f"{sum(ratios) / 2:.3f} ± {abs(ratios[0] - ratios[1]) / math.sqrt(2):.3f}"
    assert rows["mixed"][6] == "95.000 ± 7.071%"  # route = domain: 90% and 100%
    assert rows["lora-mix-r4"][5] == "1.000 ± 0.000"


def test_the_published_peft_lora_bound_is_the_specialists_own(tmp_path):
    """docs/results/modular-40: the three per-domain PEFT LoRAs, each on its own domain, give 7.875 (0.988x LoRA r=4
    on the mix), the numbers docs/results/README.md prints."""
    rows = _seeds_table(ROOT / "docs" / "results" / "modular-40")
    assert rows["PEFT LoRA specialists, perfect routing"][4:6] == ["7.875 ± 0.000", "0.988 ± 0.000"]
    assert rows["specialists, perfect routing"][4:6] == ["8.249 ± 0.000", "1.035 ± 0.000"]


def test_the_seeds_table_gives_each_domains_change_when_a_fourth_skill_joins(tmp_path):
    """Per seed, each domain's perplexity with the fourth skill over without it; mean ± std over the seeds."""
    for seed, math_after in (("1", 4.04), ("2", 3.96)):
        _seed(tmp_path / seed, 0.0)
        _report(tmp_path / seed, "loras-mixed-calibrated", {"math": 4.0, "code": 5.0, "wikitext-2-raw": 6.0})
        _report(tmp_path / seed, "loras-mixed-calibrated-plus-docs",
                {"math": math_after, "code": 5.0, "wikitext-2-raw": 6.03})
    rows = _seeds_table(tmp_path / "1", tmp_path / "2")
    assert rows["loras-mixed-calibrated + lora-docs"] == ["2", "0.000 ± 1.414%", "0.000 ± 0.000%", "0.500 ± 0.000%"]
    assert "mixed + branch-docs" not in rows  # no seed has that row


def test_mixes_lists_every_mix_folder_of_every_seed_for_route_after_prefix():
    """modular.sh hands these to benchmarks/route_after_prefix.py: the branch and LoRA-library mixes, each seed."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "modular.py"), "mixes", "runs/a", "runs/b"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    names = ["mixed", "mixed-null", "mixed-calibrated", "mixed-null-calibrated"]
    names += [f"loras-{name}" for name in names]
    assert out == [f"runs/{seed}/{name}" for seed in "ab" for name in names]


def test_run_of_the_branches_rows_trains_mixes_and_measures_only_the_branches(benchmark_script, tmp_path,
                                                                                monkeypatch):
    """`run --rows branches` (a seed's branch mixes measured again without its LoRAs on the mix): the three
    branches trained, mixed with and without the null, calibrated, each measured on the test text and the mixes on
    unseen text; no LoRA trained, mixed or measured."""
    monkeypatch.setenv("OUT", str(tmp_path))
    modular = benchmark_script("modular")
    done = []
    monkeypatch.setattr(modular, "run_parallel", lambda commands, jobs: done.extend(f"train {n}" for n in commands))
    monkeypatch.setattr(modular, "mix", lambda name, inputs, *extra: done.append(f"mix {name}"))
    monkeypatch.setattr(modular, "measure", lambda name, adapter, dataset=modular.TEST: done.append(f"measure {name}"))
    modular.run(1, "branches")
    branches = [f"branch-{domain}" for domain in ("math", "code", "prose")]
    assert [d for d in done if d.startswith("train")] == [f"train {n}" for n in branches] + [
        "train mixed-calibrated", "train mixed-null-calibrated"]
    assert [d for d in done if d.startswith("mix")] == ["mix mixed", "mix mixed-null"]
    measured = [d.split()[1] for d in done if d.startswith("measure")]
    assert measured == [*branches, *modular.MIXES, *(f"unseen-{name}" for name in modular.MIXES)]
    assert not any("lora" in d for d in done)
