"""Prefill and decode throughput (docs/design.md section 5): warm-up, median of repeats, synchronised.

Several models are measured with their repeats interleaved (order alternating every repeat), so drift
in machine load hits them alike and their ratio is trustworthy even where absolute times are not.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import torch

from ..errors import ConfigError
from ..integration.kv_cache_choice import (KV_CACHE_CHOICES, compiled_decode_applies, decode_cache_and_step,
                                           forward_parameters)
from ..integration.base_models import check_within_context
from ..options import option
from ..progress import progress_bar

@dataclass
class ThroughputArguments:
    """How ``benchmark`` and ``compare`` time generation."""

    skip_throughput: bool = option(False, "skip the throughput section (slow on a CPU)")
    num_samples: int = option(5, "timed repeats per throughput measurement")
    prompt_len: int = option(128, "throughput prompt length")
    new_tokens: int = option(32, "throughput decode steps")
    throughput_batch_sizes: List[int] = option(help="batch sizes for prefill/decode throughput",
                                               default_factory=lambda: [1, 4])
    kv_cache: str = option("none", "key/value cache while timing: none, int8 or int4 (KVCacheCompressor)",
                           choices=KV_CACHE_CHOICES)
    compiled_decode: bool = option(True, "on CUDA, time decoding with a dynamic KV cache and no compilation instead "
                                         "of a static cache replayed as CUDA graphs (a CPU never compiles)")


THROUGHPUT_METHOD = ("manual greedy loop with a KV cache: prefill = one forward pass over the prompt; decode = "
                     "new_tokens forward passes of one token per sequence")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(model, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random prompts (ids above the first 100, where special tokens usually live).

    Speed does not depend on the text, and the same prompts serve a base and an augmented model.
    """
    vocab = int(model.config.vocab_size)
    low = min(100, vocab - 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch_size, prompt_len), generator=generator)


def _forward_kwargs(model) -> Dict[str, str]:
    """Names of the KV-cache and last-logits arguments: Transformers renamed ``past_key_values`` to
    ``cache`` in 5.x; ``logits_to_keep`` (older: absent) spares the vocabulary projection of the prompt."""
    params = forward_parameters(model)
    return {"cache": "cache" if "cache" in params else "past_key_values",
            "keep": "logits_to_keep" if "logits_to_keep" in params else None}


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def _time_generation(model, input_ids: torch.Tensor, new_tokens: int, kv_cache: str = "none",
                     compiled_decode: bool = True, compile_config=None) -> Dict[str, float]:
    """One timed prefill and ``new_tokens`` timed single-token decode steps (greedy, KV cache); on the compiled
    path (``kv_cache_choice.decode_cache_and_step``) the decode steps run the compiled call on a static cache."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    names = _forward_kwargs(model)
    extra = {names["keep"]: 1} if names["keep"] else {}
    cache, step = decode_cache_and_step(model, kv_cache, compiled_decode, input_ids.shape[0],
                                        input_ids.shape[1] + new_tokens, compile_config)
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, **extra, **({names["cache"]: cache} if cache is not None else {}))
    synchronize(device)
    prefill = time.perf_counter() - start
    cache = _output_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        del out  # a CUDA graph's replay reuses its last outputs' memory: none may stay alive (as generate() does)
        if step is not model:
            torch.compiler.cudagraph_mark_step_begin()
        out = step(input_ids=token, use_cache=True, **{names["cache"]: cache}, **extra)
        cache = _output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    synchronize(device)
    decode = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_s": decode}


def _summarise(samples: List[Dict[str, float]], batch_size: int, prompt_len: int, new_tokens: int) -> Dict:
    prefill = statistics.median(s["prefill_s"] for s in samples)
    decode = statistics.median(s["decode_s"] for s in samples)
    return {"batch_size": batch_size,
            "prefill_tokens_per_s": batch_size * prompt_len / prefill,
            "decode_tokens_per_s": batch_size * new_tokens / decode,
            "prefill_seconds_median": prefill, "decode_seconds_median": decode,
            "decode_ms_per_step": 1000.0 * decode / new_tokens,
            "prefill_seconds_samples": [s["prefill_s"] for s in samples],
            "decode_seconds_samples": [s["decode_s"] for s in samples]}


def _check_throughput_args(models, num_samples: int, prompt_len: int, new_tokens: int,
                           batch_sizes: Sequence[int]) -> None:
    if num_samples < 1 or prompt_len < 1 or new_tokens < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"throughput needs num_samples, prompt_len, new_tokens and batch sizes >= 1; got "
                          f"num_samples={num_samples}, prompt_len={prompt_len}, new_tokens={new_tokens}, "
                          f"batch_sizes={tuple(batch_sizes)}.")
    for model in models:
        check_within_context(model.config, prompt_len + new_tokens, "--prompt-len + --new-tokens")


def measure_throughput(model, num_samples: int = 5, prompt_len: int = 128, new_tokens: int = 32,
                       batch_sizes: Sequence[int] = (1, 4), progress: bool = True, kv_cache: str = "none",
                       compiled_decode: bool = True) -> Dict:
    """Prefill and decode tokens/s per batch size: one warm-up run, then the median of ``num_samples``."""
    return measure_interleaved([model], num_samples, prompt_len, new_tokens, batch_sizes, progress, kv_cache,
                               compiled_decode)[0]


def measure_interleaved(models: List, num_samples: int, prompt_len: int, new_tokens: int,
                        batch_sizes: Sequence[int], progress: bool = True, kv_cache: str = "none",
                        compiled_decode: Union[bool, Sequence[bool]] = True) -> List[Dict]:
    """Measure several models with their repeats interleaved (order alternating every repeat), so that
    drift in machine load (other processes, thermal throttling) hits them alike. ``compiled_decode``: one switch for
    all, or one per model (the same model may come twice, eager and compiled, as benchmarks/gpu.py measures it).

    ``progress``: a bar over every generation run, warm-ups included (each one is a prefill and
    ``new_tokens`` decode steps, seconds apiece on a CPU)."""
    _check_throughput_args(models, num_samples, prompt_len, new_tokens, batch_sizes)
    compiled = list(compiled_decode) if isinstance(compiled_decode, (list, tuple)) else [compiled_decode] * len(models)
    batch_sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    states = [m.training for m in models]
    for m in models:
        m.eval()
    samples = [{b: [] for b in batch_sizes} for _ in models]
    runs = len(batch_sizes) * (num_samples + 1) * len(models)
    try:
        with progress_bar(runs, "throughput", "run", progress) as bar:
            for b in batch_sizes:
                bar.set_postfix_str(f"batch {b}")
                prompts = prompt_ids(models[0], b, prompt_len)
                for m, switch in zip(models, compiled):  # warm-up: allocator, kernels, lazy initialisation, compiling
                    _time_generation(m, prompts, new_tokens, kv_cache, switch)
                    bar.update()
                for rep in range(num_samples):
                    order = range(len(models)) if rep % 2 == 0 else reversed(range(len(models)))
                    for i in order:
                        samples[i][b].append(_time_generation(models[i], prompts, new_tokens, kv_cache,
                                                              compiled[i]))
                        bar.update()
    finally:
        for m, state in zip(models, states):
            m.train(state)
    device = model_device(models[0])
    results = []
    for model, switch, per_model in zip(models, compiled, samples):
        results.append({"method": THROUGHPUT_METHOD, "device": str(device), "prompt_len": prompt_len,
                        "new_tokens": new_tokens, "num_samples": num_samples, "warmup_runs": 1,
                        "torch_threads": torch.get_num_threads(),
                        "compiled_decode": compiled_decode_applies(model, kv_cache, switch),
                        "results": [_summarise(per_model[b], b, prompt_len, new_tokens) for b in batch_sizes]})
    return results


def compare_throughput(base_model, augmented_model, num_samples: int = 5, prompt_len: int = 128,
                       new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 4), progress: bool = True) -> Dict:
    """Throughput of a base and an augmented model side by side, repeats interleaved.

    Both models must be separate objects on the same device (``augment_model`` works in place, so load
    the base twice). Returns ``{"base": ..., "augmented": ..., "ratios": [...]}`` where each ratio entry
    holds, per batch size, ``prefill_ratio`` and ``decode_ratio`` = augmented tokens/s / base tokens/s
    (below 1: the adapters cost that share of the speed).
    """
    if base_model is augmented_model:
        raise ConfigError("compare_throughput needs two model objects; augment_model works in place, so load "
                          "the base model twice.")
    if model_device(base_model) != model_device(augmented_model):
        raise ConfigError(f"the base model is on {model_device(base_model)} and the augmented one on "
                          f"{model_device(augmented_model)}; put both on the same device.")
    base, augmented = measure_interleaved([base_model, augmented_model], num_samples, prompt_len, new_tokens,
                                          batch_sizes, progress)
    ratios = []
    for b, a in zip(base["results"], augmented["results"]):
        ratios.append({"batch_size": b["batch_size"],
                       "prefill_ratio": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                       "decode_ratio": a["decode_tokens_per_s"] / b["decode_tokens_per_s"]})
    return {"base": base, "augmented": augmented, "ratios": ratios,
            "ratio_definition": "augmented tokens/s divided by base tokens/s, same run, repeats interleaved"}
