"""`llama-expert benchmark`: the embedded model end to end (slow), a missing adapter as a clear error, a PEFT LoRA
folder, each domain of `--dataset a,b` with the domain-expert information, and an output never replaced unasked."""

import json
import math
import warnings

import pytest

from llama_expert.cli import main
from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.integration.base_models import load_base_model, load_tokenizer


@pytest.mark.slow
def test_benchmark_embedded_model_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["benchmark", "--model-path", "smollm2-135m", "--max-tokens", "150", "--seq-len", "64",
               "--batch-size", "2", "--skip-throughput", "--routing-windows", "1", "--output-json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "untrained adapters compute exactly the base model" in printed
    assert "capped by --max-tokens 150" in printed
    report = json.loads(out.read_text())
    ppl = report["perplexity"]
    assert ppl["windows"] == 2 and ppl["seq_len"] == 64 and ppl["tokens_evaluated"] == 2 * 63
    assert ppl["max_tokens"] == 150 and ppl["tokens_in_windows"] == 128
    assert ppl["dataset"] == "embedded" and ppl["split"] == "test"
    assert 1 < ppl["perplexity"] < 100  # the instruct model reads Python's documentation well
    assert report["throughput"] is None
    assert report["model"]["fresh_adapter"] and report["model"]["base_model"] == "smollm2-135m"
    assert len(report["routing_health"]["layers"]) == 30
    # SmolLM2-135M: 30 layers, 3 kv heads of 64 dims, float32
    assert report["memory"]["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 4


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    rc = main(["benchmark", "--adapter", str(tmp_path / "no-such-adapter"), "--skip-throughput"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "adapter folder not found" in err and "Traceback" not in err
    assert str(tmp_path / "no-such-adapter") in err


def test_benchmark_measures_a_peft_lora_folder(trained_base, lora_on_trained_base, tmp_path, capsys):
    """What `train --method lora` and `distill` write is benchmarked like MoE adapters: the perplexity PEFT's
    own model of that folder gets, with the throughput section (through PEFT's wrapper)."""
    from peft import PeftModel

    from llama_expert.evaluation.benchmark import ExpertModelBenchmark
    from llama_expert.integration.base_models import load_base_model, load_tokenizer

    folder, text = trained_base
    out = tmp_path / "report.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["benchmark", "--adapter", str(lora_on_trained_base), "--dataset", str(text), "--seq-len", "32",
                     "--max-tokens", "256", "--num-samples", "1", "--prompt-len", "8", "--new-tokens", "4",
                     "--throughput-batch-sizes", "1", "--no-progress", "--output-json", str(out)]) == 0
    assert f"adapter {lora_on_trained_base}" in capsys.readouterr().out
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # the cache argument's current name
    report = json.loads(out.read_text())
    peft_model = PeftModel.from_pretrained(load_base_model(str(folder)), str(lora_on_trained_base)).eval()
    expected = ExpertModelBenchmark(peft_model, load_tokenizer(str(folder)), dataset=str(text), seq_len=32,
                                    max_tokens=256, progress=False).benchmark_perplexity()["perplexity"]
    assert report["perplexity"]["perplexity"] == expected
    assert report["throughput"]["results"][0]["decode_tokens_per_s"] > 0


def test_output_json_never_replaces_a_file_unless_asked_and_is_checked_before_loading(chat_folder, tmp_path,
                                                                                      cli_error):
    out = tmp_path / "report.json"
    out.write_text("my earlier report")
    small = ["--skip-throughput", "--max-tokens", "64", "--seq-len", "32", "--routing-windows", "1", "--no-progress"]
    err = cli_error(["benchmark", "--model", str(tmp_path / "no-model"), "--output-json", str(out), *small])
    assert err == f"error: --output-json {out} already exists; pass --overwrite to replace it, or another file."
    assert out.read_text() == "my earlier report"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    err = cli_error(["benchmark", "--model", str(tmp_path / "no-model"), "--output-json", str(blocker / "r.json"),
                     *small])
    assert f"--output-json {blocker / 'r.json'} cannot be written ({blocker} is a file, not a folder)" in err
    assert main(["benchmark", "--model", str(chat_folder), "--output-json", str(out), "--overwrite", *small]) == 0
    assert json.loads(out.read_text())["perplexity"]["seq_len"] == 32


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


def test_an_oracle_adapter_is_benchmarked_with_each_window_labelled_by_its_dataset(trained_base, tmp_path, capsys,
                                                                                    cli_error):
    """Several --dataset sources are the oracle's domains, in order: every section runs (throughput and memory
    with one label for their random prompts) and each domain uses its own expert; one dataset gives no labels,
    which is one error line naming the fix."""
    import torch

    from llama_expert import ExpertConfig, augment_model, save_adapter
    from llama_expert.integration.surgery import adapters

    base_folder, train_text = trained_base
    model = augment_model(load_base_model(str(base_folder)),
                          ExpertConfig(router_type="oracle", num_experts=2, expert_allocation="uniform"))
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.experts.up.normal_(std=0.1)
    folder = tmp_path / "oracle"
    save_adapter(model, folder, base_model_name_or_path=str(base_folder))
    prose, digits = tmp_path / "prose.txt", tmp_path / "digits.txt"
    prose.write_text(train_text.read_text())
    digits.write_text("0123456789 9876543210 " * 200)
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--model", str(folder), "--dataset", f"{prose},{digits}", "--seq-len", "32",
                 "--max-tokens", "96", "--routing-windows", "2", "--num-samples", "1", "--prompt-len", "4",
                 "--new-tokens", "2", "--throughput-batch-sizes", "1", "--output-json", str(out),
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert set(report["perplexity"]["domains"]) == {"prose", "digits"} and report["throughput"] and report["memory"]
    assert all(layer["domain_expert_nmi"] == 1.0 for layer in report["routing_health"]["layers"])
    line = cli_error(["benchmark", "--model", str(folder), "--dataset", str(prose), "--seq-len", "32",
                      "--max-tokens", "96", "--skip-throughput", "--no-progress"])
    assert line.startswith("error: --router-type oracle routes each sequence by its domain label") \
        and "one --dataset source per domain" in line, line
