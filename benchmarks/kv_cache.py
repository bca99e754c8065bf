"""KV-cache compression, measured where it matters, on SmolLM2-135M (or --model):

- bytes per cached token at none / int8 / int4 after a long sequence, and the ratio to the uncompressed cache;
- chunked perplexity on WikiText-2 test: each window is fed in chunks of CHUNK tokens through the cache, so
  every chunk after the first attends to compressed keys and values (a one-shot forward never reads them);
- greedy agreement with the uncompressed cache over NEW tokens (share of equal positions, first divergence);
- decode tokens/s at batch 1 with each cache;
- Transformers' own QuantizedCache with the optimum-quanto backend beside ours, when it is installed;
- kv_cache_memory.png: cache bytes against sequence length.

    python benchmarks/kv_cache.py [--model smollm2-135m] [--windows 4] [--window-len 1024] [--chunk 64]
"""

import argparse
import math
import os

import torch

from llama_expert.data import load_split, tokenize_documents
from llama_expert.evaluation.throughput import measure_throughput
from llama_expert.integration.kv_cache import KVCacheCompressor
from llama_expert.integration.kv_cache_choice import cache_kwargs
from llama_expert.integration.base_models import load_base_model, load_tokenizer

from common import PROSE_TEST, machine, today


def caches(model, residual: int):
    from transformers import DynamicCache

    made = {"none": lambda: DynamicCache(config=model.config),
            "int8": lambda: KVCacheCompressor(model.config, 8, residual),
            "int4": lambda: KVCacheCompressor(model.config, 4, residual)}
    try:
        import optimum.quanto  # noqa: F401
        from transformers.cache_utils import QuantizedCache
    except ImportError:
        return made
    for bits in (4, 2):
        made[f"quanto int{bits}"] = (lambda b: lambda: QuantizedCache("quanto", model.config, nbits=b,
                                                                       residual_length=residual, q_group_size=64))(bits)
    return made


def tensor_bytes(t) -> int:
    """Bytes of a tensor, or of the inner tensors of a quantised tensor subclass (quanto's QTensor)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(tensor_bytes(getattr(layer, name, None)) for layer in cache.layers
               for name in ("keys", "values", "_quantized_keys", "_quantized_values"))


@torch.no_grad()
def chunked_nll(model, window: torch.Tensor, make, chunk: int):
    cache = make()
    logits = [model(input_ids=window[None, s:s + chunk], use_cache=True, **cache_kwargs(model, cache)).logits
              for s in range(0, window.numel(), chunk)]
    logits = torch.cat(logits, dim=1)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
    return float(nll), window.numel() - 1, cache


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new: int, make) -> torch.Tensor:
    out = model.generate(prompt[None], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0, **cache_kwargs(model, make()))
    return out[0, prompt.numel():]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-len", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--residual", type=int, default=64, help="full-precision window (tokens)")
    parser.add_argument("--new", type=int, default=256, help="greedy tokens compared")
    parser.add_argument("--out", default="runs/kv-cache")
    args = parser.parse_args()
    model, tokenizer = load_base_model(args.model).eval(), load_tokenizer(args.model)
    ids = tokenize_documents(load_split(PROSE_TEST, None, tokenizer, "test"), tokenizer, False)
    windows = ids[: args.windows * args.window_len].view(args.windows, args.window_len)
    made = caches(model, args.residual)
    rows = {}
    for name, make in made.items():
        total, count = 0.0, 0
        for window in windows:
            nll, n, cache = chunked_nll(model, window, make, args.chunk)
            total, count = total + nll, count + n
        prompt = windows[0, :64]
        reference = rows["none"]["greedy"] if rows else None
        tokens = greedy(model, prompt, args.new, make)
        agree = float((tokens == reference).float().mean()) if reference is not None else 1.0
        diverge = int((tokens != reference).nonzero()[0]) if reference is not None and agree < 1 else None
        rows[name] = {"ppl": math.exp(total / count), "bytes_per_token": cache_bytes(cache) / args.window_len,
                      "greedy": tokens, "agreement": agree, "first_divergence": diverge}
        print(f"measured {name}", flush=True)
    speeds = {name: measure_throughput(model, 3, 128, 64, [1], progress=False, kv_cache=name)["results"][0]
              ["decode_tokens_per_s"] for name in ("none", "int8", "int4")}
    base = rows["none"]
    print(f"\nKV cache on {args.model} ({model.dtype}), {today()}, {machine('cpu')}; WikiText-2 test: "
          f"{args.windows} windows of {args.window_len} tokens fed in chunks of {args.chunk}; full-precision window "
          f"{args.residual} tokens; greedy: {args.new} tokens after a 64-token prompt")
    print("| cache | bytes / token | smaller by | chunked PPL | vs none | greedy agreement | first divergence | "
          "decode tok/s (b=1) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        speed = f"{speeds[name]:.1f}" if name in speeds else "-"
        print(f"| {name} | {r['bytes_per_token']:,.0f} | {base['bytes_per_token'] / r['bytes_per_token']:.2f}x | "
              f"{r['ppl']:.4f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {100 * r['agreement']:.1f}% | "
              f"{'-' if r['first_divergence'] is None else r['first_divergence']} | {speed} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    os.makedirs(args.out, exist_ok=True)
    lengths = list(range(args.chunk, args.window_len + 1, args.chunk))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("none", "int8", "int4"):
        cache, sizes = made[name](), []
        with torch.no_grad():
            for s in range(0, args.window_len, args.chunk):
                model(input_ids=windows[0, None, s:s + args.chunk], use_cache=True, **cache_kwargs(model, cache))
                sizes.append(cache_bytes(cache) / 2 ** 20)
        ax.plot(lengths, sizes, label=name)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(f"KV cache memory, {args.model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "kv_cache_memory.png"), dpi=100)


if __name__ == "__main__":
    main()
