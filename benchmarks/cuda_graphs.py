"""Decode speed on a GPU with and without CUDA graphs: base, MoE adapters and merged LoRA.

Each model generates through `generate()` twice over: with the default dynamic KV cache (eager, one kernel
launch per op), and with `cache_implementation="static"`, for which Transformers compiles the forward with
`torch.compile(mode="reduce-overhead")`, i.e. replays CUDA graphs. Decode tokens/s = batch x new tokens /
(time of generating 1 + new tokens - time of generating 1 token), median of the repeats, after a warm-up that
compiles. Random weights in bfloat16 (speed does not depend on them); the MoE experts are random, non-zero.

    python benchmarks/cuda_graphs.py [--models Llama-3.2-1B,SmolLM2-135M] [--batches 1,8] [--out runs/cuda-graphs]
    python benchmarks/cuda_graphs.py --tiny          # a CPU dry run of the code path (no graphs on a CPU)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from llama_expert.evaluation.throughput import prompt_ids, synchronize

from common import command, machine, today
from decode_speed import random_merged_lora, random_moe
from gpu import build


def generation_seconds(model, prompts, new_tokens: int, static: bool) -> float:
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    synchronize(prompts.device)
    start = time.perf_counter()
    model.generate(prompts, **kwargs)
    synchronize(prompts.device)
    return time.perf_counter() - start


def decode_rate(model, prompts, new_tokens: int, static: bool, repeats: int) -> float:
    for tokens in (1, 1 + new_tokens):  # warm-up: compilation and graph capture for both lengths
        generation_seconds(model, prompts, tokens, static)
    samples = []
    for _ in range(repeats):
        one = generation_seconds(model, prompts, 1, static)
        full = generation_seconds(model, prompts, 1 + new_tokens, static)
        samples.append(prompts.shape[0] * new_tokens / max(full - one, 1e-9))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="Llama-3.2-1B,SmolLM2-135M")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a dry run")
    parser.add_argument("--out", default="runs/cuda-graphs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("no CUDA device: CUDA graphs need one (python benchmarks/cuda_graphs.py --tiny for a CPU dry run)")
    if args.tiny:
        args.models, args.prompt_len, args.new_tokens, args.repeats = "SmolLM2-135M", 8, 4, 1
    lines = [f"{command()} ({machine(device)}{', dry run' if args.tiny else ''}, {today()}; bfloat16, random "
             f"weights, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats})", "",
             "| model | variant | batch | eager tokens/s | CUDA graphs tokens/s | graphs / eager | vs base (graphs) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        base = build(name, args.tiny, device).eval()
        models = {"base": base, "MoE adapters": random_moe(base), "merged LoRA": random_merged_lora(base)}
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = prompt_ids(base, batch, args.prompt_len).to(device)
            base_graphs = None
            for label, model in models.items():
                eager = decode_rate(model, prompts, args.new_tokens, False, args.repeats)
                graphs = decode_rate(model, prompts, args.new_tokens, True, args.repeats)
                base_graphs = base_graphs or graphs
                lines.append(f"| {name} | {label} | {batch} | {eager:,.1f} | {graphs:,.1f} | {graphs / eager:.2f}x | "
                             f"{graphs / base_graphs:.3f} |")
                (out / "cuda_graphs.md").write_text("\n".join(lines) + "\n")
                print(lines[-1], flush=True)
        del base, models
        if device == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
