"""Every registered router keeps an augmented causal LM causal, and decoding with the KV cache exact.

A router may look at its own token only (``llama_expert.modeling.routing``). If one looked at the whole
flattened batch (a mean over tokens, a capacity limit, a normalisation over the sequence), training would
leak the future into the past and cached decoding would compute something else than the full forward
pass. Each test below runs for every name in ``ROUTERS``, on the tiny random Llama with adapters made
non-trivial first (the output projections start at zero, which would make any router look causal). Every pass
carries domain labels (row i: domain i % 2), which only the oracle router reads.
"""

import inspect

import pytest
import torch

from llama_expert import ExpertConfig, augment_model
from llama_expert.integration.surgery import domain_labels
from llama_expert.modeling.routing import ROUTERS

LEARNED = [name for name in ROUTERS.names() if name != "oracle"]  # routers that choose

VOCAB, LENGTH, BATCH = 128, 20, 2


def _augmented(model, router_type, seed=0, **config):
    """Augment ``model`` with ``router_type`` and give every adapter random output weights and routers."""
    base_logits = _logits(model, _ids())
    augment_model(model, ExpertConfig(router_type=router_type, num_experts=4, top_k=2, expert_allocation="uniform",
                                      lora_dropout=0.0, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            up = layer.mlp.experts.up
            up.copy_(torch.randn(up.shape, generator=generator) * 0.05)
            for p in layer.mlp.router.parameters():  # routers sharp enough that the choice matters
                p.copy_(torch.randn(p.shape, generator=generator))
    model.eval()
    change = (_logits(model, _ids()) - base_logits).abs().max()
    assert change > 1e-2, f"the adapters barely change the logits ({change:.2e}): the test would prove nothing"
    return model


def _ids(seed=1, batch=BATCH, length=LENGTH):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _labels(batch):
    return torch.arange(batch) % 2


@torch.no_grad()
def _logits(model, ids, labels=None):
    with domain_labels(model, _labels(ids.shape[0]) if labels is None else labels):
        return model(input_ids=ids, use_cache=False).logits


def _cache_name(model):
    """Transformers 5 renamed ``past_key_values`` to ``cache`` (as evaluation/throughput.py handles)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def _incremental_logits(model, ids, prefill):
    """Logits of ``ids`` computed as a prefill of ``prefill`` tokens, then one token at a time with the cache."""
    name = _cache_name(model)
    with domain_labels(model, _labels(ids.shape[0])):
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        pieces, cache = [out.logits], _output_cache(out)
        assert cache is not None
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: cache})
            pieces.append(out.logits)
            cache = _output_cache(out)
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("router_type", ROUTERS.names())
def test_logits_at_t_ignore_the_tokens_after_t(tiny_model, router_type):
    model = _augmented(tiny_model, router_type)
    ids = _ids()
    full = _logits(model, ids)
    for t in (0, 6, 13, LENGTH - 2):
        changed = ids.clone()
        changed[:, t + 1:] = _ids(seed=100 + t, length=LENGTH - t - 1)
        assert not torch.equal(changed[:, t + 1:], ids[:, t + 1:])
        got = _logits(model, changed)
        torch.testing.assert_close(got[:, :t + 1], full[:, :t + 1], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{router_type}: logits up to position {t} changed with the "
                                                 f"tokens after it. {m}")
        assert (got[:, t + 1:] - full[:, t + 1:]).abs().max() > 1e-3  # the future positions did change


@pytest.mark.parametrize("router_type", ROUTERS.names())
def test_a_sequence_ignores_the_other_sequences_of_its_batch(tiny_model, router_type):
    model = _augmented(tiny_model, router_type)
    ids = _ids(batch=3)
    together = _logits(model, ids)
    for row in range(3):
        alone = _logits(model, ids[row:row + 1], labels=_labels(3)[row:row + 1])
        torch.testing.assert_close(alone[0], together[row], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{router_type}: sequence {row} depends on its batch. {m}")


@pytest.mark.parametrize("prefill", [1, 7])
@pytest.mark.parametrize("router_type", ROUTERS.names())
def test_cached_decoding_equals_the_full_forward_pass(tiny_model, router_type, prefill):
    model = _augmented(tiny_model, router_type)
    ids = _ids()
    full = _logits(model, ids)
    stepwise = _incremental_logits(model, ids, prefill)
    assert stepwise.shape == full.shape
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5,
                               msg=lambda m: f"{router_type}: decoding with the KV cache (prefill {prefill}) "
                                             f"differs from one forward pass. {m}")


@pytest.mark.parametrize("router_type", LEARNED)  # oracle refuses a null expert (test_oracle.py)
def test_lora_experts_with_a_null_expert_decode_as_the_full_pass_and_stay_causal(tiny_model, router_type):
    """The bank of own A_i, B_i with a shared expert and a null choice: cached decoding (the decode kernel on a CPU)
    equals one forward pass, and a position ignores the tokens after it."""
    model = _augmented(tiny_model, router_type, expert_type="lora_experts", expert_rank=3, shared_expert_rank=2,
                       null_expert=True)
    ids = _ids()
    full = _logits(model, ids)
    torch.testing.assert_close(_incremental_logits(model, ids, 7), full, rtol=0, atol=1e-5)
    changed = ids.clone()
    changed[:, 11:] = _ids(seed=7, length=LENGTH - 11)
    torch.testing.assert_close(_logits(model, changed)[:, :11], full[:, :11], rtol=0, atol=1e-5)


@pytest.mark.parametrize("router_type", ROUTERS.names())
def test_greedy_generate_with_cache_equals_recomputing_every_step(tiny_model, router_type):
    """``model.generate`` (KV cache) picks the same tokens as argmax over a fresh full pass at every step."""
    model = _augmented(tiny_model, router_type)
    prompt = _ids(batch=1, length=5)
    with domain_labels(model, _labels(1)):
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=8, min_new_tokens=8, pad_token_id=0, eos_token_id=None)
    ids = prompt
    for _ in range(8):
        next_token = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    assert generated.tolist() == ids.tolist()
