"""Transformers 5 renamed the KV-cache argument ``past_key_values`` to ``cache`` and removes the old name in
5.40 (pyproject caps below it). Every path that decodes with a cache passes the name the installed
version has (``cache_kwargs``): none of them may trigger Transformers' deprecation message."""

import logging
import queue
import warnings

import pytest
import torch

from llama_expert import ExpertConfig, augment_model
from llama_expert.evaluation.throughput import measure_throughput
from llama_expert.inference.batching import BatchEngine, Request
from llama_expert.inference.generation import generate_ids

DEPRECATED = "`past_key_values`/`cache_params` are deprecated"


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("router_type", ["aux_free", "sequence_aux_free"])  # the latter reads each pass's cache
def test_no_decoding_path_uses_the_deprecated_cache_name(chat_folder, embedded_tokenizer, router_type):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model = AutoModelForCausalLM.from_pretrained(chat_folder).eval()
    augment_model(model, ExpertConfig(num_experts=4, top_k=2, lora_r=4, router_type=router_type))
    tokenizer = embedded_tokenizer
    records = Records()
    logging.Logger.warning_once.cache_clear()  # Transformers' warning_once: a message seen earlier would hide
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = torch.tensor([tokenizer("hello there")["input_ids"]])
            model(input_ids=ids, labels=ids, use_cache=False)  # a training pass: no cache in, none out
            for kv_cache in ("none", "int4"):
                generate_ids(model, tokenizer, ids, max_new_tokens=3, temperature=0, top_p=1, kv_cache=kv_cache)
                measure_throughput(model, num_samples=1, prompt_len=4, new_tokens=2, kv_cache=kv_cache)
            engine = BatchEngine(model, tokenizer, kv_cache="int8")
            events = queue.Queue()
            engine.submit(Request(ids=ids[0].tolist(), max_tokens=3, temperature=0), events.put)
            while events.get(timeout=60)[0] not in ("done", "error"):
                pass
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if DEPRECATED in m]
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_a_cpu_decodes_as_before_whatever_the_compiled_decode_switch(tiny_model):
    """Compiled decoding is for CUDA: on a CPU the cache ``--kv-cache`` names and the model itself, either way."""
    from llama_expert.integration.kv_cache_choice import (cache_kwargs, compiled_decode_applies,
                                                          decode_cache_and_step, generation_cache_kwargs)

    for switch in (True, False):
        assert not compiled_decode_applies(tiny_model, "none", switch)
        assert generation_cache_kwargs(tiny_model, "none", switch) == {}
        assert decode_cache_and_step(tiny_model, "none", switch, 1, 8) == (None, tiny_model)
        kwargs = generation_cache_kwargs(tiny_model, "int8", switch)
        assert list(kwargs) == list(cache_kwargs(tiny_model, object()))  # the compressed cache, by its name


@pytest.mark.parametrize("router_type", ["aux_free", "sequence_aux_free"])
def test_the_compiled_decode_loop_computes_what_the_eager_loop_computes(tiny_model, router_type):
    """``benchmark``'s decode loop on the compiled path (a static cache, the model's compiled call): here traced by
    dynamo as one graph (``fullgraph``) and run on the CPU, the same trace CUDA graphs replay; the logits are the
    dynamic-cache loop's, and a second loop of the same shape reuses the same static cache (fixed addresses)."""
    from transformers.generation import CompileConfig

    from llama_expert.integration.kv_cache_choice import decode_cache_and_step
    from llama_expert.integration.surgery import adapters

    torch.manual_seed(0)
    model = augment_model(tiny_model, ExpertConfig(num_experts=4, top_k=2, lora_r=4, router_type=router_type))
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.experts.up.normal_(std=0.05)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()

    @torch.no_grad()
    def loop(cache, step):
        out = model(input_ids=ids, use_cache=True, **({"cache": cache} if cache is not None else {}))
        token, cache, logits = out.logits[:, -1:].argmax(-1), out.cache, []
        for _ in range(4):
            out = step(input_ids=token, use_cache=True, cache=cache)
            token, cache = out.logits[:, -1:].argmax(-1), out.cache
            logits.append(out.logits[:, -1])
        return torch.stack(logits, 1), cache

    eager, _ = loop(None, model)
    config = CompileConfig(backend="eager", fullgraph=True)
    compiled, first_cache = loop(*decode_cache_and_step(model, "none", True, 2, 9, config))
    again, second_cache = loop(*decode_cache_and_step(model, "none", True, 2, 9, config))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-5)
    assert second_cache is first_cache
    torch._dynamo.reset()
