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
