"""The seed's documented surfaces work as written: ExpertModelBenchmark(model_path=..., is_augmented=True),
its four methods, and ``python main.py <command>``."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import ConfigError, ExpertConfig, ExpertModelBenchmark, augment_model, load_base_model, \
    load_tokenizer, save_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny random Llama with the embedded model's tokenizer, saved as a local base model."""
    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("seed") / "tiny-base"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_folder(base_folder):
    model = load_base_model(str(base_folder))
    augment_model(model, ExpertConfig(num_experts=4, expert_allocation="uniform"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.up.normal_(std=0.05)  # a "trained" adapter: it changes the logits
    return save_adapter(model, base_folder.parent / "llama-expert")


def _bench(**kwargs):
    return ExpertModelBenchmark(dataset="embedded", seq_len=64, max_tokens=256, **kwargs)


def test_benchmark_from_an_adapter_folder_as_in_the_seed(adapter_folder, base_folder):
    bench = _bench(model_path=str(adapter_folder), is_augmented=True)
    ppl = bench.benchmark_perplexity()
    # the same numbers as a model built by hand from the same base and adapter
    from llama_expert import load_augmented_model

    model, _ = load_augmented_model(str(base_folder), adapter_path=str(adapter_folder))
    by_hand = ExpertModelBenchmark(model, load_tokenizer(str(base_folder)), dataset="embedded", seq_len=64,
                                   max_tokens=256).benchmark_perplexity()
    assert ppl["perplexity"] == pytest.approx(by_hand["perplexity"], rel=1e-6)
    throughput = bench.benchmark_throughput(num_samples=2, prompt_len=8, new_tokens=2, batch_sizes=(1,))
    assert throughput["num_samples"] == 2 and throughput["results"][0]["decode_tokens_per_s"] > 0
    memory = bench.benchmark_memory()
    assert memory["kv_cache_bytes_per_token"] == 2 * 2 * 1 * 16 * 4  # K and V, 2 layers, 1 kv head, dim 16, fp32
    report = bench.run_full_benchmark(throughput=False)
    assert report["model"]["augmented"] and report["perplexity"]["perplexity"] == pytest.approx(ppl["perplexity"])


def test_is_augmented_on_a_base_id_gives_fresh_adapters_equal_to_the_base(base_folder):
    fresh = _bench(model_path=str(base_folder), is_augmented=True)
    plain = _bench(model_path=str(base_folder), is_augmented=False)
    assert fresh.run_full_benchmark(throughput=False)["model"]["augmented"]
    assert not plain.run_full_benchmark(throughput=False)["model"]["augmented"]
    assert fresh.benchmark_perplexity()["perplexity"] == plain.benchmark_perplexity()["perplexity"]


def test_is_augmented_false_on_an_adapter_folder_is_refused(adapter_folder):
    with pytest.raises(ConfigError, match="is_augmented=False benchmarks a plain base model"):
        _bench(model_path=str(adapter_folder), is_augmented=False)


def test_a_model_object_needs_its_tokenizer(base_folder):
    with pytest.raises(ConfigError, match="pass the tokenizer"):
        ExpertModelBenchmark(load_base_model(str(base_folder)))
    with pytest.raises(ConfigError, match="needs a model"):
        ExpertModelBenchmark()


@pytest.mark.parametrize("command", ["train", "benchmark", "compare", "inference"])
def test_main_py_runs_each_command(command):
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), command, "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: llama-expert {command}")


def test_seed_compare_form_measures_the_adapter(adapter_folder, base_folder, tmp_path):
    """`compare --base-model B --augmented-model A` (the seed's form) measures base and adapter."""
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "compare", "--base-model", str(base_folder),
                           "--augmented-model", str(adapter_folder), "--output-dir", str(out), "--skip-throughput",
                           "--eval-seq-len", "64", "--max-tokens", "256", "--routing-windows", "1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    report = json.loads((out / "compare.json").read_text())
    assert report["model"] == str(base_folder) and report["moe_adapter"] == str(adapter_folder)
    assert report["results"]["moe"]["perplexity"] != report["results"]["base"]["perplexity"]
