"""ExpertModelBenchmark: perplexity against a hand computation, the token cap, throughput against a fake
clock, memory against the KV-cache formula and the real cache, routing health (with a forced collapse) and
the full JSON report, its sections handed over in order as measured. The `benchmark` command:
tests/cli/test_benchmark.py."""

import copy
import json
import math
import os
import resource
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_expert import ConfigError, ExpertConfig, augment_model
from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.evaluation.reports import format_report
from llama_expert.evaluation.throughput import compare_throughput, measure_throughput

from ..conftest import CharTokenizer

TEXT = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Mixture of experts routes every token to a few small networks.\n",
    "A frozen base model keeps what it knew; the adapters learn the rest.\n",
] * 3


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
    docs = [(text_folder / "test.txt").read_text()]  # a text file is one document, as written
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
    docs = [(text_folder / "test.txt").read_text()]  # a text file is one document, as written
    total, count, _ = hand_perplexity(tiny_model, docs, 64, max_tokens=200)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    with pytest.raises(ConfigError, match="--max-tokens 50 is less than one window of --seq-len 64"):
        ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=64, max_tokens=50)
    with pytest.raises(ConfigError, match="exceeds the model's context of 256"):
        ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=512).windows()


class FakeClock:
    """``time.perf_counter`` for the throughput module: it advances only when a model runs a forward pass.

    Each model is charged a fixed number of seconds per token it is given, one price for a prefill (more
    than one token per row) and one for a decode step, so every tokens/s figure is known exactly.
    """

    def __init__(self):
        self.now = 100.0
        self.prefills = []  # which model ran each prefill, in order

    def perf_counter(self):
        return self.now

    def charge(self, model, name, prefill_seconds_per_token, decode_seconds_per_token):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids.shape[1] > 1:
                self.prefills.append(name)
                self.now += prefill_seconds_per_token * ids.numel()
            else:
                self.now += decode_seconds_per_token * ids.numel()
        return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture
def clock(monkeypatch):
    import llama_expert.evaluation.throughput as throughput

    fake = FakeClock()
    monkeypatch.setattr(throughput, "time", fake)
    return fake


def test_throughput_counts_every_token_of_every_row(tiny_model, clock):
    """Known costs in, exact tokens/s out: batch rows, prompt tokens and decode steps are all counted."""
    clock.charge(tiny_model, "base", prefill_seconds_per_token=0.002, decode_seconds_per_token=0.010)
    one = measure_throughput(tiny_model, num_samples=3, prompt_len=8, new_tokens=5, batch_sizes=(1, 3))
    assert [r["batch_size"] for r in one["results"]] == [1, 3]
    for row in one["results"]:
        b = row["batch_size"]
        assert row["prefill_tokens_per_s"] == pytest.approx(500.0)  # 1 / 0.002 s per token, whatever the batch
        assert row["decode_tokens_per_s"] == pytest.approx(100.0)  # 1 / 0.010 s per token
        assert row["prefill_seconds_median"] == pytest.approx(0.002 * b * 8)
        assert row["decode_seconds_median"] == pytest.approx(0.010 * b * 5)  # new_tokens steps, no more
        assert row["decode_ms_per_step"] == pytest.approx(10.0 * b)
        assert len(row["decode_seconds_samples"]) == len(row["prefill_seconds_samples"]) == 3
    assert clock.prefills == ["base"] * 8  # per batch size: one warm-up + three timed runs
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        measure_throughput(tiny_model, prompt_len=250, new_tokens=10)


def test_compare_throughput_ratio_is_augmented_over_base_with_repeats_interleaved(tiny_model, clock):
    augmented = augment_model(copy.deepcopy(tiny_model), moe_config())
    clock.charge(tiny_model, "base", prefill_seconds_per_token=0.001, decode_seconds_per_token=0.004)
    clock.charge(augmented, "augmented", prefill_seconds_per_token=0.002, decode_seconds_per_token=0.005)
    both = compare_throughput(tiny_model, augmented, num_samples=3, prompt_len=8, new_tokens=3, batch_sizes=(1, 2))
    for ratio in both["ratios"]:
        assert ratio["prefill_ratio"] == pytest.approx(0.5)  # the augmented model prefills at half the speed
        assert ratio["decode_ratio"] == pytest.approx(0.8)  # and decodes at 4/5 of it
    assert [r["decode_tokens_per_s"] for r in both["base"]["results"]] == pytest.approx([250.0, 250.0])
    assert [r["decode_tokens_per_s"] for r in both["augmented"]["results"]] == pytest.approx([200.0, 200.0])
    # warm-up base then augmented, then the order alternates every repeat, for each batch size
    per_batch = ["base", "augmented", "base", "augmented", "augmented", "base", "base", "augmented"]
    assert clock.prefills == per_batch * 2
    json.dumps(both)
    with pytest.raises(ConfigError, match="two model objects"):
        compare_throughput(tiny_model, tiny_model)


def _cache_tensors(cache):
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            yield layer.keys
            yield layer.values
    elif hasattr(cache, "key_cache"):
        yield from cache.key_cache
        yield from cache.value_cache
    else:
        for keys, values in cache:
            yield keys
            yield values


@pytest.mark.parametrize("dtype,dtype_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_cache_bytes_per_token_match_the_formula_and_the_real_cache(tiny_model, dtype, dtype_bytes):
    augmented = augment_model(tiny_model.to(dtype), moe_config())
    mem = ExpertModelBenchmark(augmented, CharTokenizer(), seq_len=32, batch_size=2).benchmark_memory()
    # 2 (K and V) * 4 layers * 2 kv heads * head_dim 64/4 = 16 * bytes per element
    assert mem["kv_cache_bytes_per_token"] == 2 * 4 * 2 * 16 * dtype_bytes
    assert mem["kv_cache_bytes_per_window"] == 32 * 2 * mem["kv_cache_bytes_per_token"]
    assert mem["kv_cache_bytes_full_context"] == 256 * mem["kv_cache_bytes_per_token"]
    # ... and the cache the model really builds holds exactly that per token
    with torch.no_grad():
        out = augmented(input_ids=torch.randint(0, 128, (1, 10)), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    held = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
    assert held == 10 * mem["kv_cache_bytes_per_token"]


def test_memory_section_counts_parameters(tiny_model):
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    augmented = augment_model(tiny_model, moe_config())
    mem = ExpertModelBenchmark(augmented, CharTokenizer(), seq_len=32).benchmark_memory()
    adapter = [p for n, p in augmented.named_parameters() if ".mlp." in n and "base_mlp" not in n]
    adapter_bytes = sum(p.numel() * 4 for p in adapter)  # the aux_free router's selection bias included
    assert mem["adapter_parameter_bytes"] == adapter_bytes > 0
    assert mem["trainable_parameter_bytes"] == sum(p.numel() * 4 for p in adapter if p.requires_grad) > 0
    assert mem["parameter_bytes"] == base_bytes + adapter_bytes


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm and Linux's ru_maxrss in kilobytes")
def test_cpu_peak_memory_is_the_process_peak_rss_in_bytes(tiny_model):
    page = os.sysconf("SC_PAGE_SIZE")

    def resident_bytes():
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    resident_before = resident_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = ExpertModelBenchmark(tiny_model, CharTokenizer(), seq_len=32).benchmark_memory()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = mem["peak"]
    assert mem["device"] == "cpu" and peak["kind"] == "peak RSS of the process"
    # a peak is at least what is resident now (the kernel's counters lag by a few pages: 5% slack; a unit
    # error would be a factor of 1024), and it is the kernel's figure (kilobytes) in bytes
    assert peak["bytes"] >= 0.95 * resident_before
    assert peak_before <= peak["bytes"] <= peak_after


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


def test_sections_are_reported_in_order_as_measured(tiny_model, text_folder):
    model = augment_model(copy.deepcopy(tiny_model), moe_config())
    bench = ExpertModelBenchmark(model, CharTokenizer(), dataset=str(text_folder), seq_len=64, max_tokens=128,
                                 progress=False)
    seen = []
    report = bench.run_full_benchmark(num_samples=1, prompt_len=8, new_tokens=2, batch_sizes=(1,), routing_windows=1,
                                      on_section=lambda name, result: seen.append((name, result)))
    assert [name for name, _ in seen] == ["perplexity", "routing_health", "throughput", "memory"]
    assert all(result is report[name] for name, result in seen)
    # a base model without throughput: the skipped sections are None in the report and not announced
    seen.clear()
    base = ExpertModelBenchmark(tiny_model, CharTokenizer(), dataset=str(text_folder), seq_len=64, max_tokens=128,
                                progress=False).run_full_benchmark(throughput=False, on_section=lambda n, r: seen.append(n))
    assert seen == ["perplexity", "memory"]
    assert base["routing_health"] is None and base["throughput"] is None
