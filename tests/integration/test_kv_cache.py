"""KVCacheCompressor: KIVI-style quantisation (keys per channel, values per token), each token quantised once,
a full-precision window, and a model that reads its compressed past (chunked forward, generate)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llama_expert import KVCacheCompressor
from llama_expert.errors import ConfigError
from llama_expert.integration.kv_cache import dequantize, quantize
from llama_expert.integration.kv_cache_choice import make_cache

CONFIG = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=100, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_error_is_at_most_half_a_step_and_codes_round_trip(bits):
    x = torch.randn(2, 3, 16, 64)
    for dim in (-1, -2):
        packed, low, step = quantize(x, dim, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == (64 if bits == 8 else 32)
        back = dequantize(packed, low, step, bits, torch.float32)
        assert float((back - x).abs().max()) <= float(step.float().max()) * 0.5 + 1e-3
    assert torch.equal(quantize(back, -1, bits)[0], quantize(back, -1, bits)[0])


@torch.no_grad()
@pytest.mark.parametrize("bits,tolerance", [(8, 0.01), (4, 0.2)])
def test_a_chunked_forward_reads_the_compressed_past(model, bits, tolerance):
    ids = torch.randint(0, 100, (2, 100), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = KVCacheCompressor(CONFIG, bits=bits, residual_length=16)
    got = torch.cat([model(ids[:, s:s + 10], cache=cache, use_cache=True).logits for s in range(0, 100, 10)],
                    dim=1)
    assert cache.get_seq_length() == 100
    layer = cache.layers[0]
    assert layer._stored[0].shape[2] == 96 and layer.keys.shape[2] == 4  # six groups of 16 stored, 4 in the window
    torch.testing.assert_close(got[:, :10], full[:, :10])  # the first chunk attends to itself only: exact
    gap = float((got - full).abs().max())
    assert 0 < gap < tolerance, gap


@torch.no_grad()
def test_each_token_is_quantised_once(model):
    cache = KVCacheCompressor(CONFIG, bits=4, residual_length=8)
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    model(ids[:, :16], cache=cache, use_cache=True)
    first = [part.clone() for part in cache.layers[1]._stored]
    model(ids[:, 16:40], cache=cache, use_cache=True)
    later = cache.layers[1]._stored
    for old, new in zip(first, later):  # what was stored is unchanged; newer groups are appended after it
        assert torch.equal(new[:, :, :old.shape[2]], old)


@torch.no_grad()
def test_greedy_generation_agrees_and_the_cache_is_smaller(model):
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(3))
    plain = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    int8 = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0,
                          cache=KVCacheCompressor(CONFIG, bits=8, residual_length=16))
    assert torch.equal(int8, plain)
    sizes = {}
    for name, cache in {"full": DynamicCache(config=CONFIG), "int8": make_cache(model, "int8"),
                        "int4": make_cache(model, "int4")}.items():
        model(torch.randint(0, 100, (1, 448)), cache=cache, use_cache=True)
        sizes[name] = cache.nbytes() if name != "full" else sum(
            t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert sizes["full"] / sizes["int8"] > 3.0 and sizes["full"] / sizes["int4"] > 5.0, sizes  # float32 model


@torch.no_grad()
def test_keys_and_values_are_quantised_in_groups_of_group_size(model):
    """Keys: a minimum and a step per channel for every 32 tokens; values: per token for every 32 channels."""
    cache = KVCacheCompressor(CONFIG, bits=4, residual_length=64, group_size=32)
    model(torch.randint(0, 100, (1, 130)), cache=cache, use_cache=True)
    k_codes, k_low, _, v_codes, v_low, _ = cache.layers[0]._stored
    assert k_codes.shape[2] == 128 and k_low.shape[2:] == (4, 1, 64)  # two windows of 64 = four key groups
    assert v_codes.shape[2:] == (128, 2, 16) and v_low.shape[2:] == (128, 2, 1)  # 64 channels = two groups
    assert cache.layers[0].keys.shape[2] == 2  # 130 - 128 tokens wait in the window


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="8 or 4 bits"):
        KVCacheCompressor(CONFIG, bits=2)
    with pytest.raises(ConfigError, match="group_size must be"):
        KVCacheCompressor(CONFIG, bits=4, residual_length=64, group_size=7)


@torch.no_grad()
def test_a_window_that_group_size_does_not_divide_groups_keys_by_their_common_divisor(model):
    cache = KVCacheCompressor(CONFIG, bits=4, residual_length=48, group_size=32)
    model(torch.randint(0, 100, (1, 100)), cache=cache, use_cache=True)
    assert cache.layers[0].key_group == 16 and cache.layers[0]._stored[1].shape[2] == 6  # 96 tokens, 6 groups
    with pytest.raises(ConfigError, match="--kv-cache must be one of"):
        make_cache(None, "int3")
    assert make_cache(None, "none") is None


def test_inference_and_benchmark_take_kv_cache(trained_base, tmp_path, capsys):
    from llama_expert.cli import main

    folder, text = trained_base
    replies = {}
    for kind in ("none", "int8"):
        capsys.readouterr()
        assert main(["inference", "--model", str(folder), "--prompt", "The quick brown", "--temperature", "0",
                     "--max-new-tokens", "12", "--no-chat-template", "--kv-cache", kind]) == 0
        replies[kind] = capsys.readouterr().out
    assert replies["int8"] == replies["none"] and replies["none"].strip()
    report = tmp_path / "bench.json"
    assert main(["benchmark", "--model", str(folder), "--no-augmented", "--dataset", str(text), "--seq-len", "32",
                 "--max-tokens", "64", "--num-samples", "1", "--prompt-len", "8", "--new-tokens", "4",
                 "--throughput-batch-sizes", "1", "--kv-cache", "int4", "--output-json", str(report),
                 "--no-progress"]) == 0
    import json
    assert json.loads(report.read_text())["throughput"]["kv_cache"] == "int4"
