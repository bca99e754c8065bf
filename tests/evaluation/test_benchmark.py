"""ExpertModelBenchmark: perplexity against a hand computation, the token cap, throughput, memory,
routing health (with a forced collapse), the full JSON report and the `benchmark` command."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama_expert import ConfigError, ExpertConfig, augment_model
from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.evaluation.reports import format_report
from llama_expert.evaluation.throughput import compare_throughput, measure_throughput

TEXT = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Mixture of experts routes every token to a few small networks.\n",
    "A frozen base model keeps what it knew; the adapters learn the rest.\n",
] * 3


class CharTokenizer:
    """One token per character (code point mod 128): a tokenizer small enough for the tiny Llama."""

    pad_token_id = eos_token_id = 0
    chat_template = None

    def __call__(self, text, return_attention_mask=True, verbose=True, **kwargs):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "test.txt").write_text("".join(TEXT))
    return folder


def moe_config():
    return ExpertConfig(num_experts=4, top_k=2, expert_allocation="uniform")


def hand_perplexity(model, docs, seq_len, max_tokens=None):
    ids = [ord(c) % 128 for c in "\n\n".join(docs)]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            window = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]])
            logp = F.log_softmax(model(input_ids=window).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                total -= logp[t, window[0, t + 1]].item()
                count += 1
    return total, count, n


def test_perplexity_equals_hand_computation(tiny_model, text_folder):
    bench = ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=64)
    result = bench.benchmark_perplexity(word_perplexity=True)
    docs = (text_folder / "test.txt").read_text().splitlines(keepends=True)
    total, count, n = hand_perplexity(tiny_model, docs, 64)
    assert result["windows"] == n and result["seq_len"] == 64
    assert result["tokens_evaluated"] == count == n * 63
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert not result["capped"] and result["split"] == "test" and result["dataset"] == str(text_folder)
    # word perplexity: same total NLL over the whitespace-separated words of the evaluated text
    text = "\n\n".join(docs)[: n * 64]
    assert result["words"] == len(text.split())
    assert result["word_perplexity"] == pytest.approx(math.exp(total / len(text.split())), rel=1e-4)
    assert "NOT comparable" in result["word_perplexity_note"]


def test_fresh_adapters_give_the_base_perplexity(tiny_model, text_folder):
    bench = ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=64)
    base = bench.benchmark_perplexity()
    augmented = augment_model(copy.deepcopy(tiny_model), moe_config())
    aug = ExpertModelBenchmark(augmented, CharTokenizer(), dataset=str(text_folder), seq_len=64).benchmark_perplexity()
    assert aug["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)


def test_token_cap_is_respected_and_reported(tiny_model, text_folder):
    bench = ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=64, max_tokens=200,
                                 batch_size=2)
    result = bench.benchmark_perplexity()
    assert result["windows"] == 3 and result["tokens_in_windows"] == 192 <= 200
    assert result["tokens_evaluated"] == 3 * 63
    assert result["max_tokens"] == 200 and result["capped"]
    assert result["tokens_available"] > 400
    docs = (text_folder / "test.txt").read_text().splitlines(keepends=True)
    total, count, _ = hand_perplexity(tiny_model, docs, 64, max_tokens=200)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    with pytest.raises(ConfigError, match="--max-tokens 50 is less than one window of --seq-len 64"):
        ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=64, max_tokens=50)
    with pytest.raises(ConfigError, match="exceeds the model's context of 256"):
        ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=512).windows()


def test_throughput_and_compare_ratios(tiny_model):
    one = measure_throughput(tiny_model, num_samples=2, prompt_len=8, new_tokens=3, batch_sizes=(1, 2))
    assert [r["batch_size"] for r in one["results"]] == [1, 2]
    for row in one["results"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert len(row["decode_seconds_samples"]) == 2
    augmented = augment_model(copy.deepcopy(tiny_model), moe_config())
    both = compare_throughput(tiny_model, augmented, num_samples=2, prompt_len=8, new_tokens=3, batch_sizes=(1, 2))
    for ratio, b, a in zip(both["ratios"], both["base"]["results"], both["augmented"]["results"]):
        assert ratio["prefill_ratio"] == pytest.approx(a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"])
        assert ratio["decode_ratio"] > 0
    json.dumps(both)
    with pytest.raises(ConfigError, match="two model objects"):
        compare_throughput(tiny_model, tiny_model)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        measure_throughput(tiny_model, prompt_len=250, new_tokens=10)


def test_memory_section(tiny_model):
    augmented = augment_model(tiny_model, moe_config())
    mem = ExpertModelBenchmark(augmented, CharTokenizer(), seq_len=32).benchmark_memory()
    assert mem["parameter_bytes"] == sum(p.numel() * p.element_size() for p in augmented.parameters())
    assert 0 < mem["adapter_parameter_bytes"] == mem["trainable_parameter_bytes"] < mem["parameter_bytes"]
    assert mem["kv_cache_bytes_per_token"] == 2 * 4 * 2 * 16 * 4  # layers, kv heads, head_dim, float32
    assert mem["kv_cache_bytes_full_context"] == 256 * mem["kv_cache_bytes_per_token"]
    assert mem["peak"]["bytes"] > mem["parameter_bytes"]


def test_routing_health_load_sums_to_one_and_detects_collapse(tiny_model, text_folder):
    augmented = augment_model(copy.deepcopy(tiny_model), moe_config())
    bench = ExpertModelBenchmark(augmented, CharTokenizer(), dataset=str(text_folder), seq_len=64)
    health = bench.routing_health(max_windows=2)
    assert health["windows"] == 2 and len(health["layers"]) == 4
    for layer in health["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert sum(layer["token_share"]) == pytest.approx(2.0)  # top-2: every token fills two slots
        assert layer["tokens"] == 128
        assert 0.0 <= layer["normalized_entropy"] <= 1.0
    # Force layer 0's router to send every token to expert 0: a constant input and a weight favouring 0.
    router = augmented.model.layers[0].mlp.router
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 1.0
    handle = router.register_forward_pre_hook(lambda module, args: (torch.ones_like(args[0]),) + tuple(args[1:]))
    try:
        health = bench.routing_health(max_windows=2)
    finally:
        handle.remove()
    first = health["layers"][0]
    assert first["token_share"][0] == pytest.approx(1.0)
    assert sum(first["load"]) == pytest.approx(1.0)
    assert any("layer 0: expert 0" in w and "collapse" in w for w in health["warnings"])
    assert any("nearly unused" in w for w in first["warnings"])
    assert not health["healthy"]
    with pytest.raises(ConfigError, match="needs an augmented model"):
        ExpertModelBenchmark(tiny_model, CharTokenizer()).routing_health()


def test_full_report_is_json(tiny_model, text_folder):
    augmented = augment_model(tiny_model, moe_config())
    bench = ExpertModelBenchmark(augmented, CharTokenizer(), dataset=str(text_folder), seq_len=64, max_tokens=128)
    report = bench.run_full_benchmark(word_perplexity=True, num_samples=1, prompt_len=8, new_tokens=2,
                                      batch_sizes=(1,), routing_windows=1)
    report = json.loads(json.dumps(report))
    assert set(report) >= {"model", "environment", "settings", "perplexity", "routing_health", "throughput", "memory"}
    assert report["model"]["augmented"] and report["perplexity"]["windows"] == 2
    table = format_report(report)
    for words in ("Perplexity", "word perplexity", "Routing health", "Throughput", "Memory", "KV cache"):
        assert words in table


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_benchmark_embedded_model_writes_json(tmp_path, capsys):
    from llama_expert.cli import main

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
    assert report["memory"]["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 4


def test_cli_missing_adapter_is_a_clear_error(tmp_path, capsys):
    from llama_expert.cli import main

    rc = main(["benchmark", "--adapter", str(tmp_path / "no-such-adapter"), "--skip-throughput"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "adapter folder not found" in err and "Traceback" not in err
