"""PEFT's own routing over a library of per-domain LoRAs, the rows of benchmarks/modular.py that users of PEFT would
try instead of `llama-expert mix`: Arrow (Ostapenko et al. 2024: each token routed, per layer, to the LoRAs whose top
singular direction it aligns with; no training) and X-LoRA (Buehler & Buehler 2024: a classifier on the hidden states
scales every LoRA per token, trained with the LoRAs frozen).

    python benchmarks/peft_routing.py arrow --adapters A B C --top-k 1 --output-json F
    python benchmarks/peft_routing.py xlora --adapters A B C --dataset TRAIN --steps N --learning-rate LR --output-json F

The LoRAs are `llama-expert train --method lora` folders. X-LoRA's classifier trains as `train` trains: the same
blocks in the same order (`training.schedule.Schedule`), AdamW with the same warm-up and cosine
(`training.optimizer.build_optimizer`), the same gradient clipping, no autocast on a CPU; one scaling per layer and LoRA (`layerwise_scalings`), so it
has the trainable parameters of the mix's routers. Each model is measured as `llama-expert benchmark --dtype bfloat16
--seq-len 512` measures (`ExpertModelBenchmark`) and written in its JSON layout (the `perplexity` section).
"""

import argparse
import json
import sys
import time

import torch

from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.files import atomic_write_text
from llama_expert.integration.base_models import load_base_model, load_tokenizer
from llama_expert.training.arguments import DataArguments, TrainingArguments
from llama_expert.training.optimizer import build_optimizer
from llama_expert.training.recipe import RecipeData
from llama_expert.training.schedule import Schedule


def arrow_model(base, adapters, top_k: int):
    from peft import ArrowConfig, create_arrow_model

    return create_arrow_model(base, list(adapters), ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0))


def xlora_model(base, adapters):
    from peft import XLoraConfig, get_peft_model

    base.config.use_cache = False  # X-LoRA refuses a model that caches
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, layerwise_scalings=True,
                         adapters={str(i): path for i, path in enumerate(adapters)})  # PEFT 0.21 wants "0", "1"...
    return get_peft_model(base, config)


def train_classifier(model, tokenizer, args) -> dict:
    """X-LoRA's classifier alone, on ``args.dataset`` as `train --max-steps steps --batch-size 4` would see it."""
    training = TrainingArguments(seq_len=args.seq_len, batch_size=4, max_steps=args.steps,
                                 learning_rate=args.learning_rate, seed=args.seed)
    blocks = RecipeData(tokenizer, DataArguments(dataset=args.dataset), args.seq_len, None, 8192, False).train
    schedule = Schedule.plan(training, len(blocks), world=1)
    trained = [p for p in model.parameters() if p.requires_grad]  # the classifier (before a forward may unfreeze)
    optimizer, scheduler = build_optimizer(trained, None, args.learning_rate, training.weight_decay, schedule)
    model.train()
    start = time.perf_counter()
    for step in range(schedule.total_steps):
        batch = blocks[schedule.rows(step, 0, 0)]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, training.max_grad_norm)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"seconds": time.perf_counter() - start, "trainable_parameters": sum(p.numel() for p in trained)}


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("router", choices=["arrow", "xlora"])
    parser.add_argument("--adapters", nargs="+", required=True, help="the per-domain LoRA folders")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--test", required=True, help="test datasets, comma-separated, as benchmark --dataset")
    parser.add_argument("--test-tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=1, help="arrow: LoRAs each token combines")
    parser.add_argument("--dataset", help="xlora: training datasets, comma-separated, as train --dataset")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(args.model, dtype=torch.bfloat16), load_tokenizer(args.model)
    summary = {"router": args.router, "adapters": args.adapters}
    if args.router == "arrow":
        model = arrow_model(base, args.adapters, args.top_k).eval()
        summary.update(top_k=args.top_k, seconds=0.0, trainable_parameters=0)
    else:
        if not args.dataset:
            sys.exit("xlora trains its classifier: give --dataset")
        model = xlora_model(base, args.adapters)
        summary.update(train_classifier(model, tokenizer, args), steps=args.steps, learning_rate=args.learning_rate)
    bench = ExpertModelBenchmark(model, tokenizer, dataset=args.test, seq_len=512, max_tokens=args.test_tokens,
                                 progress=False)
    with torch.no_grad():
        summary["perplexity"] = bench.benchmark_perplexity()
    atomic_write_text(args.output_json, json.dumps(summary, indent=2) + "\n")
    print(f"{args.router}: mean perplexity {summary['perplexity']['perplexity']:.3f} -> {args.output_json}")


if __name__ == "__main__":
    main(sys.argv[1:])
