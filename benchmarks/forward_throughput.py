#!/usr/bin/env python
"""Forward throughput (tokens/s) of a base model vs. the same model with MoE adapters.

The base is loaded once and deep-copied; the copy is augmented with the default ExpertConfig. After
warm-up runs, every repeat times one base forward and one augmented forward (alternating which goes
first), so that drifting machine load hits both alike. Reports the median tokens/s of each and the
ratio augmented / base as a Markdown table.

    python benchmarks/forward_throughput.py --model smollm2-135m --seq-len 256 --batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time

import torch

from llama_expert import ExpertConfig, augment_model, load_base_model

from common import machine


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="Hub id, local folder, .gguf file or 'smollm2-135m'")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each model (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def timed_forward(model, input_ids, attention_mask) -> float:
    start = time.perf_counter()
    model(input_ids=input_ids, attention_mask=attention_mask)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    base = load_base_model(args.model).eval()
    augmented = augment_model(copy.deepcopy(base), ExpertConfig())
    augmented.eval()  # also puts the freshly built adapters in eval mode (no router noise, no dropout)

    vocab = base.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.batch_size, args.seq_len))
    attention_mask = torch.ones_like(input_ids)
    tokens = input_ids.numel()

    with torch.no_grad():  # sanity: untrained adapters compute the base model
        diff = (augmented(input_ids=input_ids[:1, :32]).logits - base(input_ids=input_ids[:1, :32]).logits)
    max_diff = diff.abs().max().item()

    for _ in range(args.warmup):
        timed_forward(base, input_ids, attention_mask)
        timed_forward(augmented, input_ids, attention_mask)

    base_tps, aug_tps = [], []
    for repeat in range(args.repeats):
        order = [("base", base), ("aug", augmented)]
        if repeat % 2:
            order.reverse()
        for name, model in order:
            tps = tokens / timed_forward(model, input_ids, attention_mask)
            (base_tps if name == "base" else aug_tps).append(tps)

    base_med, aug_med = statistics.median(base_tps), statistics.median(aug_tps)
    paired = statistics.median(a / b for a, b in zip(aug_tps, base_tps))

    print("| model | seq_len | batch | base tok/s | augmented tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {args.model} | {args.seq_len} | {args.batch_size} | {base_med:,.0f} | {aug_med:,.0f} "
          f"| {aug_med / base_med:.3f} |")
    print()
    print(f"- machine: {machine('cpu')}")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- {args.repeats} interleaved repeats after {args.warmup} warm-up runs each; forward under no_grad, "
          f"eval mode, float32; median of paired ratios {paired:.3f}")
    print(f"- base tok/s per repeat: {', '.join(f'{x:,.0f}' for x in base_tps)}")
    print(f"- augmented tok/s per repeat: {', '.join(f'{x:,.0f}' for x in aug_tps)}")
    print(f"- max |augmented - base| logits at step 0: {max_diff:.2e}")


if __name__ == "__main__":
    main()
