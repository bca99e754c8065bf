"""Measure a (base or augmented) model: perplexity, throughput, memory and routing health.

Every section follows DESIGN.md section 5 and returns plain Python numbers, so that
``run_full_benchmark()`` is JSON as it stands.

- Perplexity: the split's documents joined with blank lines, tokenised once, cut into non-overlapping
  windows of ``seq_len`` tokens; token-level ``exp(mean NLL)`` over every predicted token. Optionally an
  lm-evaluation-harness style *word* perplexity, a different number (see ``benchmark_perplexity``).
- Throughput: prefill and decode tokens/s at batch 1 and batched, after a warm-up, median of repeats.
- Memory: parameter bytes, KV-cache bytes per token, peak CUDA allocation or peak process RSS.
- Routing health (augmented models): per-layer expert load, router entropy, collapse warnings.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .data import load_split, pack_blocks, tokenize_documents
from .errors import ConfigError
from .perplexity import evaluate_perplexity
from .surgery import adapters, is_augmented, parameter_counts
from .usage import measure_expert_usage

LOW_LOAD_FACTOR = 0.1  # warn when an expert gets less than LOW_LOAD_FACTOR / E of the assignments
COLLAPSE_SHARE = 0.9  # warn when more than this share of the tokens routes to one expert
THROUGHPUT_METHOD = ("manual greedy loop with a KV cache: prefill = one forward pass over the prompt; decode = "
                     "new_tokens forward passes of one token per sequence")


# ---------------------------------------------------------------------------------------------- helpers
def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt_ids(model, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
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
    params = inspect.signature(model.forward).parameters
    return {"cache": "cache" if "cache" in params else "past_key_values",
            "keep": "logits_to_keep" if "logits_to_keep" in params else None}


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def _time_generation(model, input_ids: torch.Tensor, new_tokens: int) -> Dict[str, float]:
    """One timed prefill and ``new_tokens`` timed single-token decode steps (greedy, KV cache)."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    names = _forward_kwargs(model)
    extra = {names["keep"]: 1} if names["keep"] else {}
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, **extra)
    _sync(device)
    prefill = time.perf_counter() - start
    cache = _output_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{names["cache"]: cache}, **extra)
        cache = _output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
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
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and prompt_len + new_tokens > limit:
            raise ConfigError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds the model's context of "
                              f"{limit} tokens; lower one of them.")


def measure_throughput(model, num_samples: int = 5, prompt_len: int = 128, new_tokens: int = 32,
                       batch_sizes: Sequence[int] = (1, 4)) -> Dict:
    """Prefill and decode tokens/s per batch size: one warm-up run, then the median of ``num_samples``."""
    return _measure_interleaved([model], num_samples, prompt_len, new_tokens, batch_sizes)[0]


def _measure_interleaved(models: List, num_samples: int, prompt_len: int, new_tokens: int,
                         batch_sizes: Sequence[int]) -> List[Dict]:
    """Measure several models with their repeats interleaved (order alternating every repeat), so that
    drift in machine load (other processes, thermal throttling) hits them alike."""
    _check_throughput_args(models, num_samples, prompt_len, new_tokens, batch_sizes)
    batch_sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    states = [m.training for m in models]
    for m in models:
        m.eval()
    samples = [{b: [] for b in batch_sizes} for _ in models]
    try:
        for b in batch_sizes:
            prompts = _prompt_ids(models[0], b, prompt_len)
            for m in models:  # warm-up: allocator, kernels, lazy initialisation
                _time_generation(m, prompts, new_tokens)
            for rep in range(num_samples):
                order = range(len(models)) if rep % 2 == 0 else reversed(range(len(models)))
                for i in order:
                    samples[i][b].append(_time_generation(models[i], prompts, new_tokens))
    finally:
        for m, state in zip(models, states):
            m.train(state)
    device = model_device(models[0])
    results = []
    for per_model in samples:
        results.append({"method": THROUGHPUT_METHOD, "device": str(device), "prompt_len": prompt_len,
                        "new_tokens": new_tokens, "num_samples": num_samples, "warmup_runs": 1,
                        "torch_threads": torch.get_num_threads(),
                        "results": [_summarise(per_model[b], b, prompt_len, new_tokens) for b in batch_sizes]})
    return results


def compare_throughput(base_model, augmented_model, num_samples: int = 5, prompt_len: int = 128,
                       new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 4)) -> Dict:
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
    base, augmented = _measure_interleaved([base_model, augmented_model], num_samples, prompt_len, new_tokens,
                                           batch_sizes)
    ratios = []
    for b, a in zip(base["results"], augmented["results"]):
        ratios.append({"batch_size": b["batch_size"],
                       "prefill_ratio": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                       "decode_ratio": a["decode_tokens_per_s"] / b["decode_tokens_per_s"]})
    return {"base": base, "augmented": augmented, "ratios": ratios,
            "ratio_definition": "augmented tokens/s divided by base tokens/s, same run, repeats interleaved"}


def _peak_memory(device: torch.device) -> Dict:
    if device.type == "cuda":
        return {"kind": "peak CUDA memory allocated", "bytes": int(torch.cuda.max_memory_allocated(device)),
                "note": "reset before the measured forward pass"}
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return {"kind": "peak RSS of the process", "bytes": int(usage * scale),
            "note": "cannot be reset: covers everything this process did so far, model loading included"}


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


# ---------------------------------------------------------------------------------------------- benchmark
class ExpertModelBenchmark:
    """Benchmarks of one model on one dataset split.

    ``dataset``: anything ``load_text_dataset`` accepts (default ``"embedded"``: the offline corpus; a
    folder such as ``/work/shared/data/wikitext-2-raw``, a ``.txt``/``.jsonl`` file, or a Hub name with
    ``dataset_config``). ``max_tokens`` caps the evaluated tokens (whole windows only).
    ``device`` moves the model there; by default it stays where it is.
    """

    def __init__(self, model, tokenizer, dataset: Optional[str] = None, dataset_config: Optional[str] = None,
                 split: str = "test", seq_len: int = 2048, max_tokens: Optional[int] = None, batch_size: int = 1,
                 device: Optional[str] = None):
        if seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a window predicts seq_len - 1 tokens), got {seq_len}.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if max_tokens is not None and max_tokens < seq_len:
            raise ConfigError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}; raise "
                              f"--max-tokens or lower --seq-len.")
        if device is not None:
            model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset or "embedded"
        self.dataset_config = dataset_config
        self.split = split
        self.seq_len = seq_len
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.device = model_device(model)
        self._ids: Optional[torch.Tensor] = None
        self._windows: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ data
    def _check_seq_len(self) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise ConfigError(f"--seq-len {self.seq_len} exceeds the model's context of {limit} tokens "
                              f"(max_position_embeddings); lower --seq-len.")

    def token_ids(self) -> torch.Tensor:
        """The whole split tokenised once (cached)."""
        if self._ids is None:
            docs = load_split(self.dataset, self.dataset_config, self.tokenizer, self.split)
            self._ids = tokenize_documents(docs, self.tokenizer)
        return self._ids

    def windows(self) -> torch.Tensor:
        """``[n, seq_len]`` non-overlapping evaluation windows within the token cap (cached)."""
        self._check_seq_len()
        if self._windows is None:
            self._windows = pack_blocks(self.token_ids(), self.seq_len, max_tokens=self.max_tokens)
        return self._windows

    # ------------------------------------------------------------------ sections
    def benchmark_perplexity(self, word_perplexity: bool = False) -> Dict:
        """Token-level perplexity, DESIGN.md section 5 (the GPTQ/AWQ protocol).

        With ``word_perplexity=True`` also ``word_perplexity`` = exp(total NLL / number of
        whitespace-separated words of the evaluated text), as lm-evaluation-harness reports for
        WikiText. It is a *different number* from the token-level perplexity (it does not depend on the
        tokenizer, and is much larger); and as the windows here do not overlap it is close to, not
        equal to, the harness's rolling-window value.
        """
        windows = self.windows()
        result = evaluate_perplexity(self.model, windows, batch_size=self.batch_size)
        available = int(self.token_ids().numel())
        out = {
            "protocol": "token-level exp(mean NLL) over non-overlapping windows of the split joined with blank "
                        "lines (DESIGN.md section 5)",
            "dataset": self.dataset, "dataset_config": self.dataset_config, "split": self.split,
            "perplexity": float(result["perplexity"]), "mean_nll": float(result["nll"]),
            "tokens_evaluated": int(result["tokens"]),  # predicted tokens: windows * (seq_len - 1)
            "tokens_in_windows": int(windows.numel()),
            "tokens_available": available,
            "windows": int(result["windows"]), "seq_len": int(result["seq_len"]),
            "max_tokens": self.max_tokens,
            "capped": int(windows.numel()) < available - available % self.seq_len,
        }
        if word_perplexity:
            text = self.tokenizer.decode(windows.reshape(-1).tolist())
            words = len(text.split())
            total_nll = float(result["nll"]) * int(result["tokens"])
            out["word_perplexity"] = math.exp(total_nll / max(words, 1))
            out["words"] = words
            out["word_perplexity_note"] = ("lm-evaluation-harness style: exp(total NLL / whitespace-separated "
                                           "words of the evaluated text). NOT comparable with the token-level "
                                           "perplexity.")
        return out

    def benchmark_throughput(self, num_samples: int = 5, prompt_len: int = 128, new_tokens: int = 32,
                             batch_sizes: Sequence[int] = (1, 4)) -> Dict:
        """Prefill and decode tokens/s at each batch size.

        Method: a manual greedy loop with the model's KV cache (not ``model.generate``), so the two
        phases are timed separately and nothing ends a sequence early: prefill = one forward pass over
        ``batch x prompt_len`` random prompt tokens; decode = ``new_tokens`` forward passes of one token
        per sequence. One warm-up run per batch size, then the median of ``num_samples`` repeats; CUDA
        is synchronised around every timed phase.
        """
        return measure_throughput(self.model, num_samples, prompt_len, new_tokens, batch_sizes)

    @torch.no_grad()
    def benchmark_memory(self) -> Dict:
        """Parameter bytes, KV-cache bytes per token, and the peak memory after one evaluation batch.

        KV-cache bytes per token = 2 (K and V) * layers * kv_heads * head_dim * bytes of the model
        dtype. The peak is CUDA's max allocated (reset before the pass) on a GPU; on the CPU the
        process's peak RSS from ``resource.getrusage``, which cannot be reset and so covers all the
        process did before (loading included).
        """
        self._check_seq_len()
        model, config = self.model, self.model.config
        params = list(model.parameters())  # shared (tied) tensors appear once
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        adapter_bytes = sum(p.numel() * p.element_size() for _, a in adapters(model)
                            for n, p in a.named_parameters() if not n.startswith("base_mlp."))
        trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        dtype = getattr(model, "dtype", None) or params[0].dtype
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
        kv_per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        was_training = model.training
        model.eval()
        try:
            batch = _prompt_ids(model, self.batch_size, self.seq_len).to(self.device)
            model(input_ids=batch, use_cache=False)
        finally:
            model.train(was_training)
        _sync(self.device)
        context = getattr(config, "max_position_embeddings", None)
        return {
            "parameter_bytes": int(param_bytes), "parameters": int(sum(p.numel() for p in params)),
            "adapter_parameter_bytes": int(adapter_bytes), "trainable_parameter_bytes": int(trainable_bytes),
            "buffer_bytes": int(buffer_bytes), "dtype": str(dtype).replace("torch.", ""),
            "kv_cache_bytes_per_token": int(kv_per_token),
            "kv_cache_formula": f"2 * {layers} layers * {kv_heads} kv_heads * {head_dim} head_dim * "
                                f"{dtype_bytes} bytes",
            "kv_cache_bytes_per_window": int(kv_per_token * self.seq_len * self.batch_size),
            "kv_cache_bytes_full_context": int(kv_per_token * context) if context else None,
            "peak_measured_after": f"one forward pass of {self.batch_size} x {self.seq_len} tokens",
            "peak": _peak_memory(self.device), "device": str(self.device),
        }

    @torch.no_grad()
    def routing_health(self, max_windows: Optional[int] = 8) -> Dict:
        """Per-layer expert load and router entropy over (up to ``max_windows`` of) the eval windows.

        ``load``: each expert's share of the T*k (token, slot) assignments (sums to 1 per layer; uniform
        is 1/E). ``token_share``: the share of tokens that picked the expert (k * load, at most 1).
        ``entropy``: mean over tokens of the router's entropy over all E experts divided by log E
        (1 = uniform probabilities, 0 = one expert certain). Warnings: an expert with load below
        0.1/E ("nearly unused"), or picked by more than 90% of the tokens ("collapse"; checked only
        when E > k, since with E == k every expert serves every token).
        """
        model = self.model
        if not is_augmented(model):
            raise ConfigError("routing_health needs an augmented model (one with MoE adapters); this one has none.")
        windows = self.windows()
        if max_windows is not None:
            windows = windows[:max_windows]
        layers, warnings = [], []
        for row in measure_expert_usage(model, windows, self.batch_size):
            index, num_experts, tokens = row["layer"], row["num_experts"], row["tokens"]
            router = adapters(model)[index][1].router
            top_k = int(router.top_k)
            load = row["fractions"]
            share = [c / tokens if tokens else 0.0 for c in row["counts"]]
            layer_warnings = []
            for e in range(num_experts):
                if load[e] < LOW_LOAD_FACTOR / num_experts:
                    layer_warnings.append(f"layer {index}: expert {e} takes {100 * load[e]:.2f}% of the assignments "
                                          f"(< {100 * LOW_LOAD_FACTOR / num_experts:.2f}% = 0.1/E): nearly unused")
                if num_experts > top_k and share[e] > COLLAPSE_SHARE:
                    layer_warnings.append(f"layer {index}: expert {e} is picked by {100 * share[e]:.1f}% of the "
                                          f"tokens (> {100 * COLLAPSE_SHARE:.0f}%): collapse")
            warnings += layer_warnings
            layers.append({"layer": index, "module": row["module"], "num_experts": num_experts, "top_k": top_k,
                           "tokens": tokens, "load": load, "token_share": share,
                           "min_load": min(load), "max_load": max(load), "entropy": row["entropy"],
                           "normalized_entropy": row["normalized_entropy"], "warnings": layer_warnings})
        return {"windows": int(windows.shape[0]), "tokens": int(windows.numel()),
                "thresholds": {"nearly_unused_load_below": "0.1/E", "collapse_token_share_above": COLLAPSE_SHARE},
                "layers": layers, "warnings": warnings, "healthy": not warnings}

    def run_full_benchmark(self, word_perplexity: bool = False, throughput: bool = True, num_samples: int = 5,
                           prompt_len: int = 128, new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 4),
                           routing_windows: Optional[int] = 8) -> Dict:
        """All sections in one JSON-serialisable dict; ``routing_health`` is None for a base model."""
        model = self.model
        counts = parameter_counts(model)
        report = {
            "model": {"name": (getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
                               or type(model).__name__),
                      "augmented": is_augmented(model),
                      "expert_config": model.expert_config.to_dict() if is_augmented(model) else None,
                      "parameters": counts},
            "environment": environment(self.device),
            "settings": {"dataset": self.dataset, "dataset_config": self.dataset_config, "split": self.split,
                         "seq_len": self.seq_len, "max_tokens": self.max_tokens, "batch_size": self.batch_size},
        }
        report["perplexity"] = self.benchmark_perplexity(word_perplexity=word_perplexity)
        report["routing_health"] = self.routing_health(routing_windows) if is_augmented(model) else None
        report["throughput"] = self.benchmark_throughput(num_samples, prompt_len, new_tokens, batch_sizes) \
            if throughput else None
        report["memory"] = self.benchmark_memory()
        return report


def environment(device: torch.device) -> Dict:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ---------------------------------------------------------------------------------------------- report
def format_report(report: Dict, info: Optional[Dict] = None) -> str:
    """The terminal table of a ``run_full_benchmark`` report."""
    lines = []
    model, ppl = report["model"], report["perplexity"]
    params = model["parameters"]
    name = model["name"]
    if info and info.get("adapter"):
        what = f"{info['base_model']} + adapter {info['adapter']}"
    elif model["augmented"]:
        what = f"{name} + fresh MoE adapters"
    else:
        what = f"{name} (base model, no adapters)"
    env = report["environment"]
    lines.append("llama-expert benchmark")
    lines.append("=" * 72)
    lines.append(f"model              {what}")
    if info and info.get("fresh_adapter"):
        lines.append("                   note: untrained adapters compute exactly the base model, so these "
                     "numbers are the base's (plus adapter overhead in speed and memory)")
    if model["augmented"]:
        lines.append(f"parameters         {params['total']:,} total, {params['trainable']:,} trainable "
                     f"({params['trainable_percent']:.4f}%), experts per layer {params['experts_per_layer']}")
    else:
        lines.append(f"parameters         {params['total']:,}")
    lines.append(f"device             {env['device']} ({env['torch_threads']} threads), torch {env['torch']}, "
                 f"transformers {env['transformers']}")
    lines.append("")
    lines.append("Perplexity (token-level, non-overlapping windows)")
    lines.append("-" * 72)
    source = ppl["dataset"] + (f" ({ppl['dataset_config']})" if ppl.get("dataset_config") else "")
    lines.append(f"dataset            {source} [{ppl['split']}]")
    cap = f"; capped by --max-tokens {ppl['max_tokens']}" if ppl["capped"] else ""
    lines.append(f"evaluated          {ppl['windows']} windows x {ppl['seq_len']} tokens = "
                 f"{ppl['tokens_in_windows']:,} of {ppl['tokens_available']:,} tokens{cap}")
    lines.append(f"tokens predicted   {ppl['tokens_evaluated']:,}")
    lines.append(f"perplexity         {ppl['perplexity']:.4f}   (mean NLL {ppl['mean_nll']:.4f} nats/token)")
    if "word_perplexity" in ppl:
        lines.append(f"word perplexity    {ppl['word_perplexity']:.4f}   ({ppl['words']:,} words; lm-eval-harness "
                     f"style, a different number: do not compare with token perplexity)")
    health = report.get("routing_health")
    if health:
        lines.append("")
        lines.append(f"Routing health ({health['windows']} windows, {health['tokens']:,} tokens)")
        lines.append("-" * 72)
        lines.append(f"{'layer':>5} {'experts':>7} {'min load':>9} {'max load':>9} {'entropy':>8}  warnings")
        for layer in health["layers"]:
            lines.append(f"{layer['layer']:>5} {layer['num_experts']:>7} {layer['min_load']:>9.3f} "
                         f"{layer['max_load']:>9.3f} {layer['normalized_entropy']:>8.3f}  {len(layer['warnings'])}")
        lines.append("load: share of the token-slot assignments (uniform = 1/E); entropy normalised by log E")
        if health["warnings"]:
            shown = health["warnings"][:10]
            lines.append(f"WARNINGS ({len(health['warnings'])}):")
            lines += [f"  {w}" for w in shown]
            if len(health["warnings"]) > len(shown):
                lines.append(f"  ... {len(health['warnings']) - len(shown)} more in the JSON output")
        else:
            lines.append("no warnings: every expert gets at least 0.1/E of the load, none collapses")
    thr = report.get("throughput")
    if thr:
        lines.append("")
        lines.append(f"Throughput (greedy, KV cache, prompt {thr['prompt_len']} + {thr['new_tokens']} new tokens, "
                     f"median of {thr['num_samples']} after warm-up)")
        lines.append("-" * 72)
        lines.append(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/decode step':>15}")
        for row in thr["results"]:
            lines.append(f"{row['batch_size']:>5} {row['prefill_tokens_per_s']:>14,.1f} "
                         f"{row['decode_tokens_per_s']:>13,.1f} {row['decode_ms_per_step']:>15.1f}")
    mem = report.get("memory")
    if mem:
        lines.append("")
        lines.append("Memory")
        lines.append("-" * 72)
        lines.append(f"parameters         {_mb(mem['parameter_bytes'])} ({mem['dtype']}); adapters "
                     f"{_mb(mem['adapter_parameter_bytes'])}")
        lines.append(f"KV cache           {mem['kv_cache_bytes_per_token']:,} bytes/token ({mem['kv_cache_formula']})")
        if mem.get("kv_cache_bytes_full_context"):
            lines.append(f"                   {_mb(mem['kv_cache_bytes_per_window'])} per eval batch, "
                         f"{_mb(mem['kv_cache_bytes_full_context'])} for the full context")
        lines.append(f"peak               {_mb(mem['peak']['bytes'])} ({mem['peak']['kind']}; {mem['peak']['note']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None,
                        help="base model (Hub id, folder, .gguf, 'smollm2-135m') or an adapter folder; default: "
                             "the base an adapter records, else smollm2-135m")
    parser.add_argument("--adapter", default=None, help="adapter folder (written by `train`) for the base model")
    parser.add_argument("--no-augmented", action="store_true",
                        help="benchmark the plain base model (no fresh adapters) when no adapter is given")
    parser.add_argument("--dataset", default="embedded",
                        help="'embedded', a local file or folder (e.g. a WikiText-2 folder), or a Hub dataset")
    parser.add_argument("--dataset-config", default=None, help="Hub dataset config, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="test", help="split to evaluate: train, validation or test")
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window length")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--num-samples", type=int, default=5, help="timed repeats per throughput measurement")
    parser.add_argument("--prompt-len", type=int, default=128, help="throughput prompt length")
    parser.add_argument("--new-tokens", type=int, default=32, help="throughput decode steps")
    parser.add_argument("--throughput-batch-sizes", type=int, nargs="+", default=[1, 4],
                        help="batch sizes for prefill/decode throughput")
    parser.add_argument("--routing-windows", type=int, default=8, help="eval windows used for routing health")
    parser.add_argument("--word-perplexity", action="store_true",
                        help="also report lm-eval-harness style word perplexity (a different number)")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the (slow on CPU) throughput section")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None: cuda when available, else cpu")
    parser.add_argument("--output-json", default=None, help="write the full report to this JSON file")
    parser.add_argument("--dtype", default=None,
                        help="base weights dtype: float32, bfloat16, float16 or auto; None: float32")
    parser.add_argument("--auth-token", default=None, help="Hugging Face token for gated or private models")


def run_cli(args: argparse.Namespace) -> int:
    from .generate import default_device, is_adapter_folder, load_model_for_cli

    if args.no_augmented and (args.adapter or is_adapter_folder(args.model_path)):
        raise ConfigError("--no-augmented benchmarks a plain base model, but an adapter was given; drop "
                          "--no-augmented, or pass a base model without --adapter.")
    model, tokenizer, info = load_model_for_cli(args.model_path, adapter=args.adapter,
                                                augmented=not args.no_augmented, auth_token=args.auth_token,
                                                device=default_device(args.device), dtype=args.dtype)
    bench = ExpertModelBenchmark(model, tokenizer, dataset=args.dataset, dataset_config=args.dataset_config,
                                 split=args.split, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                 batch_size=args.batch_size)
    report = bench.run_full_benchmark(word_perplexity=args.word_perplexity, throughput=not args.skip_throughput,
                                      num_samples=args.num_samples, prompt_len=args.prompt_len,
                                      new_tokens=args.new_tokens, batch_sizes=args.throughput_batch_sizes,
                                      routing_windows=args.routing_windows)
    report["model"].update({"base_model": info["base_model"], "adapter": info["adapter"],
                            "fresh_adapter": info["fresh_adapter"]})
    if info["fresh_adapter"]:
        report["model"]["note"] = "fresh (untrained) adapters compute exactly the base model"
    print(format_report(report, info))
    if args.output_json:
        path = Path(args.output_json)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0
