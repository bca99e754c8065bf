"""`compare --test-dataset a,b`: each domain measured on its own windows, the mean of their log-perplexities,
and the MoE routing per layer with the domain-expert mutual information, checked against measurements
made here on the adapters compare trained (the tiny trained base: seconds)."""

import copy
import json
import math

import pytest
import torch

from llama_expert import load_adapter_weights
from llama_expert.cli import main
from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.metrics.routing import domain_specialisation
from llama_expert.integration.base_models import load_base_model, load_tokenizer


def test_compare_measures_each_domain_and_their_mean(trained_base, tmp_path, capsys):
    base_folder, train_text = trained_base
    text = tmp_path / "prose.txt"
    text.write_text(train_text.read_text())
    other = tmp_path / "digits.txt"
    other.write_text("0123456789 9876543210 " * 200)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(base_folder), "--output-dir", str(out),
                 "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0",
                 "--eval-seq-len", "32", "--max-tokens", "128", "--dataset", str(text),
                 "--test-dataset", f"{text},{other}", "--skip-throughput", "--routing-windows", "2",
                 "--no-progress"])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    base = load_base_model(str(base_folder))
    tokenizer = load_tokenizer(str(base_folder))
    moe = load_adapter_weights(copy.deepcopy(base), out / "moe").eval()
    domains = {"prose": str(text), "digits": str(other)}
    for name, model in {"base": base, "moe": moe}.items():
        row = report["results"][name]
        assert list(row["domains"]) == list(domains)
        logs = []
        for domain, source in domains.items():
            ppl = ExpertModelBenchmark(model, tokenizer, dataset=source, seq_len=32, max_tokens=128,
                                       progress=False).benchmark_perplexity()
            assert row["domains"][domain] == pytest.approx(ppl["perplexity"], rel=1e-5), (name, domain)
            logs.append(math.log(ppl["perplexity"]))
        assert row["perplexity"] == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-5), name
    assert report["results"]["base"]["domains"]["digits"] != report["results"]["base"]["domains"]["prose"]

    # Routing: per layer the NMI of domain and expert over both domains' first two windows.
    windows = [ExpertModelBenchmark(moe, tokenizer, dataset=s, seq_len=32, max_tokens=128).windows()[:2]
               for s in domains.values()]
    mine = domain_specialisation(moe, torch.cat(windows), torch.tensor([0, 0, 1, 1]), list(domains), progress=False)
    usage = report["expert_usage"]
    assert len(usage) == len(mine) == 2
    for layer, want in zip(usage, mine):
        assert layer["domains"] == list(domains)
        assert layer["domain_expert_nmi"] == pytest.approx(want["nmi"], abs=1e-9)
        assert layer["tokens"] == 4 * 32
    assert (out / "domain_expert_usage.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "| model | trainable params | prose | digits | mean PPL (exp mean log) |" in markdown
    assert "| layer | experts | entropy | min load | max load | NMI |" in markdown
    assert "![domain_expert_usage.png](domain_expert_usage.png)" in markdown
    printed = capsys.readouterr().out
    assert "| prose | digits | mean PPL (exp mean log) |" in printed
    assert "nan" not in printed  # --skip-throughput: no speed columns filled with nan


def test_benchmark_measures_each_domain_and_the_domain_expert_information(trained_base, tmp_path, capsys):
    base_folder, train_text = trained_base
    prose, digits = tmp_path / "prose.txt", tmp_path / "digits.txt"
    prose.write_text(train_text.read_text())
    digits.write_text("0123456789 9876543210 " * 200)
    out = tmp_path / "bench.json"
    code = main(["benchmark", "--model", str(base_folder), "--dataset", f"{prose},{digits}", "--seq-len", "32",
                 "--max-tokens", "96", "--skip-throughput", "--routing-windows", "2", "--output-json", str(out),
                 "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    base = load_base_model(str(base_folder))
    tokenizer = load_tokenizer(str(base_folder))
    ppl = report["perplexity"]
    logs = []
    for name, source in {"prose": prose, "digits": digits}.items():
        alone = ExpertModelBenchmark(base, tokenizer, dataset=str(source), seq_len=32, max_tokens=96,
                                     progress=False).benchmark_perplexity()
        # fresh adapters compute exactly the base: the same perplexity as the plain base, domain by domain
        assert ppl["domains"][name]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5), name
        assert ppl["domains"][name]["windows"] == 3
        logs.append(alone["mean_nll"])
    assert ppl["perplexity"] == pytest.approx(math.exp(sum(logs) / 2), rel=1e-5)
    layers = report["routing_health"]["layers"]
    assert report["routing_health"]["windows"] == 4  # two per domain
    assert all(layer["domains"] == ["prose", "digits"] and 0.0 <= layer["domain_expert_nmi"] <= 1.0
               for layer in layers)
    printed = capsys.readouterr().out
    assert "Perplexity per domain" in printed and "NMI" in printed
