"""The sequence router's prefix state rides on the KV cache of each generation: decoding step by step computes what
one forward pass computes (left-padded batches of different lengths, ``generate`` and a manual loop, beam search, the compressed KV cache),
two generations never share state, and what cannot be done (a cache filled elsewhere, cropping) is refused.

The adapters are made non-trivial first (random output weights and routers), as in test_causality.py: with the
zero-initialised output projections any routing would give the same logits.
"""

import copy
import inspect
import os
import shutil

import pytest
import torch
from transformers.cache_utils import DynamicCache

from llama_expert import ExpertConfig, augment_model
from llama_expert.errors import ConfigError
from llama_expert.integration.kv_cache_choice import cache_kwargs, make_cache
from llama_expert.integration.prefix_cache import STATE, returned_cache
from llama_expert.integration.surgery import adapters
from llama_expert.modeling.adapter import TokenMask
from llama_expert.modeling.fused_inference import FusedInference
from llama_expert.modeling.routing import PrototypeRouter

VOCAB, PAD = 128, 0
PROMPT_LENGTHS = (7, 3, 10)  # left-padded to 10
NEW = 8


def _augmented(model, seed=0, router_type="sequence_aux_free"):
    torch.manual_seed(seed)  # the banks' own draws: a twin built the same way has the same weights
    augment_model(model, ExpertConfig(router_type=router_type, num_experts=4, top_k=2,
                                      expert_allocation="uniform", lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.experts.up.copy_(torch.randn(adapter.experts.up.shape, generator=generator) * 0.05)
            adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator))
            adapter.router.bias.copy_(torch.randn(adapter.router.bias.shape, generator=generator) * 0.1)
    return model.eval()


def _prototype_routed(model, seed=0, **extra):
    """Routed by the nearest prototype (a mix's router), with random prototypes at the scale of the router inputs."""
    torch.manual_seed(seed)
    augment_model(model, ExpertConfig(router_type="prototype", num_experts=4, top_k=1, expert_allocation="uniform",
                                      lora_dropout=0.0, prototype_temperature=0.1, **extra))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            for name, up in adapter.experts.named_parameters():  # every routed B (mixlora: one per projection)
                if name.split("_")[-1] == "up" and not name.startswith("shared"):
                    up.copy_(torch.randn(up.shape, generator=generator) * 0.05)
            adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator) * 0.3)
    return model.eval()


MIXES = {"branches": {"expert_type": "lora_experts", "shared_expert_rank": 2},  # mixed branches with a shared expert
         "PEFT LoRAs": {"expert_type": "mixlora"}}  # mixed PEFT LoRAs: LoRAs inside the MLP's projections


def _mix_like(model, ids, mask, mix="branches"):
    """What ``mix --null-expert`` writes (prototype router, top-1, the ``MIXES`` bank, a null expert), each layer's
    null distance at the median of its real tokens' nearest-prototype distances in a full pass over ``ids``: the null
    wins for some tokens and loses for others. The general path for now."""
    model = _prototype_routed(model, **MIXES[mix], null_expert=True)

    def set_null(adapter, args):
        logits = adapter.router.route_sequences(args[0], adapter.token_mask).logits[mask.view(-1).bool(), :-1]
        nearest = (-logits.amax(-1) * adapter.router.temperature).sort().values
        middle = nearest.shape[0] // 2  # halfway between two tokens' distances: no token ties with the null
        adapter.router.null_distance.fill_(float(nearest[middle - 1:middle + 1].mean()))

    handles = []
    for _, adapter in adapters(model):
        adapter.fused_inference = False
        handles.append(adapter.register_forward_pre_hook(set_null))
    _full(model, ids, mask)
    for handle in handles:
        handle.remove()
    return model


def _routes(model, ids, mask):
    """[L, real tokens] each layer's choice in a full pass."""
    routes = []

    def hook(adapter, args):
        routes.append(adapter.router.route_sequences(args[0], adapter.token_mask).indices[mask.view(-1).bool(), 0])

    handles = [adapter.register_forward_pre_hook(hook) for _, adapter in adapters(model)]
    _full(model, ids, mask)
    for handle in handles:
        handle.remove()
    return torch.stack(routes)


@pytest.mark.parametrize("mix", MIXES)
def test_a_mixed_adapter_decodes_on_the_fast_paths_as_the_general_full_pass(tiny_model, monkeypatch, mix):
    """Left-padded prompts, then one token per pass: the compiled kernel (and, without it, the PyTorch fused path
    where the bank has one: not mixlora) compute what one general-path forward pass computes, and they are the paths
    taken (the general path's router entry is made to fail, and for the kernel the PyTorch plan's too)."""
    ids, mask = _continued(*_prompts())
    model = _mix_like(tiny_model, ids, mask, mix)
    full = _full(model, ids, mask)
    routes = _routes(model, ids, mask)
    assert bool((routes == 4).any()) and bool((routes < 4).any()) and len(set(routes.view(-1).tolist())) > 2

    def general_path(*args, **kwargs):
        raise AssertionError("the general path ran")

    monkeypatch.setattr(PrototypeRouter, "route_sequences", general_path)
    paths = [False] * (mix != "PEFT LoRAs") + ([True] if shutil.which("cc") or os.environ.get("CC") else [])
    for kernel in paths:
        if kernel:  # nor the per-layer set-up of the running sums: the model's pre-hook sets them up for the pass
            monkeypatch.setattr(FusedInference, "__call__", general_path)
            monkeypatch.setattr(TokenMask, "for_hidden", general_path)
        for _, adapter in adapters(model):
            adapter.fused_inference, adapter.decode_kernel, adapter.inference_plan = True, kernel, None
        for prompt in (1, max(PROMPT_LENGTHS)):
            assert _max_difference(_stepwise(model, ids, mask, prompt), full, mask) < 1e-4
        assert all((adapter.inference_plan.kernel is not None) == kernel for _, adapter in adapters(model))


def _prompts(lengths=PROMPT_LENGTHS, seed=1):
    """Left-padded prompts [B, P] and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


def _positions(mask):
    """What generate() gives a left-padded batch: the count of real tokens before each one."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _cache_name(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _full(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits


@torch.no_grad()
def _stepwise(model, ids, mask, prompt):
    """A prefill of ``prompt`` columns, then one token per pass with the cache (as the throughput loop decodes)."""
    positions = _positions(mask)
    out = model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=positions[:, :prompt],
                use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                    use_cache=True, **{_cache_name(model): cache})
        pieces.append(out.logits)
        cache = out.cache
    return torch.cat(pieces, dim=1)


def _continued(ids, mask, seed=2):
    """The prompts followed by NEW random tokens (teacher forcing: every row has its own continuation)."""
    generator = torch.Generator().manual_seed(seed)
    more = torch.randint(1, VOCAB, (ids.shape[0], NEW), generator=generator)
    return torch.cat([ids, more], dim=1), torch.cat([mask, torch.ones_like(more)], dim=1)


def _max_difference(got, want, mask):
    return float((got - want).abs().amax(-1)[mask.bool()].max())


@pytest.mark.parametrize("expert_type", ["shared_core", "mixlora"])  # mixlora: a mix of PEFT LoRAs
def test_prototype_routing_decodes_step_by_step_as_the_full_forward_pass(tiny_model, expert_type):
    model = _prototype_routed(copy.deepcopy(tiny_model), expert_type=expert_type)
    ids, mask = _continued(*_prompts())
    full = _full(model, ids, mask)
    for prompt in (1, max(PROMPT_LENGTHS)):
        assert _max_difference(_stepwise(model, ids, mask, prompt), full, mask) < 1e-4
    other = _prototype_routed(copy.deepcopy(tiny_model), expert_type=expert_type)
    with torch.no_grad():
        for _, adapter in adapters(other):
            adapter.router.weight.copy_(adapter.router.weight.roll(1, dims=0))  # each expert, another's prototype
    assert _max_difference(_full(other, ids, mask), full, mask) > 1e-3  # the prototypes decide the route


def test_a_manual_decoding_loop_computes_the_full_forward_pass(tiny_model):
    per_token = _augmented(copy.deepcopy(tiny_model), router_type="aux_free")  # the same weights, token routing
    model = _augmented(tiny_model)
    ids, mask = _continued(*_prompts())
    full = _full(model, ids, mask)
    for prompt in (1, max(PROMPT_LENGTHS)):
        assert _max_difference(_stepwise(model, ids, mask, prompt), full, mask) < 1e-4
    assert _max_difference(_full(per_token, ids, mask), full, mask) > 1e-2  # routing by the sequence matters


@pytest.mark.parametrize("kv_cache", ["none", "int8"])
def test_greedy_generate_scores_are_the_full_forward_pass(tiny_model, kv_cache):
    """Also with the compressed KV cache (``--kv-cache int8``), which carries the state as Transformers' own does:
    these 18 tokens stay in its full-precision window (64), so any difference would be the routing's."""
    model = _augmented(tiny_model)
    ids, mask = _prompts()
    cache = make_cache(model, kv_cache)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         min_new_tokens=NEW, pad_token_id=PAD, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True, **cache_kwargs(model, cache))
    assert cache is None or getattr(cache, STATE, None) is not None
    sequences = out.sequences
    assert sequences.shape == (len(PROMPT_LENGTHS), ids.shape[1] + NEW)
    full_mask = torch.cat([mask, torch.ones(len(PROMPT_LENGTHS), NEW, dtype=torch.long)], dim=1)
    full = _full(model, sequences, full_mask)[:, ids.shape[1] - 1:-1]  # the logits that chose each new token
    decoded = torch.stack(out.logits, dim=1)
    assert float((decoded - full).abs().max()) < 1e-4
    assert torch.equal(full.argmax(-1), sequences[:, ids.shape[1]:])  # greedy


def test_each_row_of_a_padded_batch_decodes_as_it_does_alone(tiny_model):
    model = _augmented(tiny_model)
    ids, mask = _prompts()
    kwargs = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=PAD, eos_token_id=None)
    together = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    for row, length in enumerate(PROMPT_LENGTHS):
        alone = ids[row:row + 1, ids.shape[1] - length:]
        assert torch.equal(model.generate(input_ids=alone, attention_mask=torch.ones_like(alone), **kwargs)[:, length:],
                           together[row:row + 1])


def test_generations_do_not_share_state(tiny_model):
    """Two generations one after the other, and two decoding loops interleaved step by step on one model, each
    compute what they compute alone: the state is the cache's, not the model's."""
    fresh = _augmented(copy.deepcopy(tiny_model))  # (a deep copy of an augmented model would share its hooks)
    model = _augmented(tiny_model)
    first, first_mask = _prompts(seed=1)
    second, second_mask = _prompts(lengths=(4, 9), seed=3)
    kwargs = dict(do_sample=False, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=None)
    model.generate(input_ids=first, attention_mask=first_mask, **kwargs)
    assert torch.equal(model.generate(input_ids=second, attention_mask=second_mask, **kwargs),
                       fresh.generate(input_ids=second, attention_mask=second_mask, **kwargs))
    assert all(adapter.token_mask.prefix is None for _, adapter in adapters(model))  # nothing left on the model

    a, a_mask = _continued(first, first_mask)
    b, b_mask = _continued(second, second_mask, seed=4)
    caches, pieces = {}, {"a": [], "b": []}
    with torch.no_grad():
        for name, ids, mask in (("a", a, a_mask), ("b", b, b_mask)):
            out = model(input_ids=ids[:, :-NEW], attention_mask=mask[:, :-NEW],
                        position_ids=_positions(mask)[:, :-NEW], use_cache=True)
            caches[name] = out.cache
            pieces[name].append(out.logits)
        for t in range(NEW, 0, -1):
            for name, ids, mask in (("a", a, a_mask), ("b", b, b_mask)):
                end = ids.shape[1] - t + 1
                out = model(input_ids=ids[:, end - 1:end], attention_mask=mask[:, :end],
                            position_ids=_positions(mask)[:, end - 1:end], use_cache=True,
                            **{_cache_name(model): caches[name]})
                pieces[name].append(out.logits)
    assert _max_difference(torch.cat(pieces["a"], dim=1), _full(model, a, a_mask), a_mask) < 1e-4
    assert _max_difference(torch.cat(pieces["b"], dim=1), _full(model, b, b_mask), b_mask) < 1e-4


def test_beam_search_reorders_the_state_with_the_cache(tiny_model):
    """Beam search with the cache picks what beam search recomputing every step from scratch picks."""
    model = _augmented(tiny_model)
    ids, mask = _prompts()
    kwargs = dict(do_sample=False, num_beams=3, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=PAD,
                  eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    recomputed = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=0, atol=1e-4)
    steps = cached.beam_indices[:, :NEW]
    assert bool((steps != steps[:, :1]).any()), "no beam was ever reordered: the test would prove nothing"


def test_a_cache_filled_without_the_state_is_refused(tiny_model):
    ids, mask = _prompts()
    with torch.no_grad():
        cache = tiny_model(input_ids=ids, attention_mask=mask, use_cache=True).cache  # before the adapters
    model = _augmented(tiny_model)
    with pytest.raises(ConfigError, match=r"holds 10 tokens but not the sequence router's running sums .* "
                                          r"start from an empty cache"):
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], dim=1),
              **{_cache_name(model): cache})
    empty = DynamicCache()  # an empty cache starts new sequences
    model(input_ids=ids, attention_mask=mask, **{_cache_name(model): empty})
    assert getattr(empty, STATE) is not None


def test_tokens_cannot_be_cropped_out_of_the_state(tiny_model):
    model = _augmented(tiny_model)
    ids, mask = _prompts()
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    cache.crop(0)  # removes nothing: allowed
    with pytest.raises(ConfigError, match="does not support assisted or speculative decoding"):
        cache.crop(-2)


def test_a_pass_leaves_no_reference_cycle_behind(tiny_model):
    """A pass's cache (its keys and values for every layer) is freed as soon as its output goes, without the cyclic
    garbage collector: wrappers that held the cache kept every evaluation pass's cache alive until a collection
    (a 3-domain training run peaked at 7.2 GB of RSS against 2.7 GB with a per-token router)."""
    import gc
    import weakref

    model = _augmented(tiny_model)
    ids, mask = _prompts()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = weakref.ref(returned_cache(out))
        assert getattr(cache(), STATE, None) is not None
        del out
        assert cache() is None, "the pass's cache outlived its output: a reference cycle holds it"
    finally:
        gc.enable()


def test_compiled_decoding_with_a_static_cache_is_the_full_forward_pass(tiny_model):
    """The path CUDA decoding takes by default (``--static-decode``): a static KV cache and the model's decode step
    compiled as one graph (``fullgraph=True``: no graph break, so no host synchronisation anywhere in the step, the
    hooks included); the sequence router's sums ride in fixed buffers (StaticPrefixState). Here the graph runs on
    the CPU through dynamo alone (backend "eager"): the same trace a CUDA graph captures."""
    from transformers.generation import CompileConfig

    from llama_expert.modeling.routing import StaticPrefixState

    model = _augmented(tiny_model)
    ids, mask = _prompts()
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # Transformers compiles only on accelerators unless told
    torch._dynamo.reset()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         min_new_tokens=NEW, pad_token_id=PAD, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True, cache_implementation="static", compile_config=compile_config)
    assert isinstance(getattr(out.past_key_values if hasattr(out, "past_key_values") else out.cache, STATE),
                      StaticPrefixState)
    full_mask = torch.cat([mask, torch.ones(len(PROMPT_LENGTHS), NEW, dtype=torch.long)], dim=1)
    full = _full(model, out.sequences, full_mask)[:, ids.shape[1] - 1:-1]
    assert float((torch.stack(out.logits, dim=1) - full).abs().max()) < 1e-4
    torch._dynamo.reset()


@pytest.mark.parametrize("adapter", ["sequence router", *MIXES])
def test_eager_decoding_on_a_static_cache_is_the_full_forward_pass(tiny_model, adapter):
    """``generate(cache_implementation="static")`` on a CPU decodes eagerly on a static cache, whose state copies the
    sums it is given into fixed buffers (StaticPrefixState): the compiled kernel (and for a sequence router the
    PyTorch fused path) hand it the sums after they are computed, not before."""
    if adapter == "sequence router":
        model = _augmented(tiny_model)
    else:
        model = _prototype_routed(tiny_model, **MIXES[adapter])
    ids, mask = _prompts()
    full_mask = torch.cat([mask, torch.ones(len(PROMPT_LENGTHS), NEW, dtype=torch.long)], dim=1)
    compiler = bool(shutil.which("cc") or os.environ.get("CC"))
    for kernel in [False] * (adapter == "sequence router") + [True] * compiler:
        for _, layer_adapter in adapters(model):
            layer_adapter.fused_inference, layer_adapter.decode_kernel, layer_adapter.inference_plan = True, kernel, None
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                             min_new_tokens=NEW, pad_token_id=PAD, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True, cache_implementation="static")
        assert all((layer_adapter.inference_plan.kernel is not None) == kernel for _, layer_adapter in adapters(model))
        full = _full(model, out.sequences, full_mask)[:, ids.shape[1] - 1:-1]
        assert float((torch.stack(out.logits, dim=1) - full).abs().max()) < 1e-4
