"""Decode speed side by side on a CPU: base, MoE-augmented and merged-LoRA models at batch 1 and 8,
repeats interleaved so that machine drift hits them alike; ratios to the base from the same run.

    python benchmarks/decode_speed.py [--model smollm2-135m] [--adapter MOE_DIR] [--kv-cache none]

Without --adapter the MoE adapters are fresh ones with random expert weights (the speed does not depend on
what they learned). The merged LoRA is a rank-8 LoRA with random B folded into the base: the base
architecture, so its ratio should be 1 within noise.
"""

import argparse
import copy

import torch

from llama_expert import ExpertConfig, augment_model
from llama_expert.evaluation.throughput import measure_interleaved
from llama_expert.integration.adapter_files import load_adapter_weights
from llama_expert.integration.base_models import load_base_model
from llama_expert.integration.surgery import adapters
from llama_expert.integration.peft_lora import add_lora

from common import command, machine, today


def random_moe(base):
    """A copy of ``base`` with default MoE adapters whose expert weights are random (non-zero), in eval mode."""
    moe = augment_model(copy.deepcopy(base), ExpertConfig())
    with torch.no_grad():
        for _, adapter in adapters(moe):
            for p in adapter.experts.parameters():
                p.normal_(std=0.01)
    return moe.eval()


def random_merged_lora(base, rank: int = 8):
    """A copy of ``base`` with a rank-``rank`` LoRA of random B folded in: the base architecture, other weights."""
    lora = add_lora(copy.deepcopy(base), rank=rank)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return lora.merge_and_unload().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-cache", default="none")
    args = parser.parse_args()
    base = load_base_model(args.model, dtype=args.dtype).eval()
    if args.adapter:
        moe = load_adapter_weights(copy.deepcopy(base), args.adapter).eval()
    else:
        moe = random_moe(base)
    merged = random_merged_lora(base)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results = measure_interleaved([base, moe, merged], args.samples, args.prompt_len, args.new_tokens, batches,
                                  progress=False, kv_cache=args.kv_cache)
    print(f"decode speed, {command()}, {today()}, {machine('cpu')}, {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.samples} interleaved repeats, kv cache {args.kv_cache}")
    print("| model | batch | decode tokens/s | vs base |")
    print("|---|---:|---:|---:|")
    for name, result in zip(("base", "MoE adapters", "merged LoRA"), results):
        for row, base_row in zip(result["results"], results[0]["results"]):
            print(f"| {name} | {row['batch_size']} | {row['decode_tokens_per_s']:.1f} | "
                  f"{row['decode_tokens_per_s'] / base_row['decode_tokens_per_s']:.3f} |")


if __name__ == "__main__":
    main()
