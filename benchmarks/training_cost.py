"""Training cost side by side: step time and peak memory of MoE adapters, PEFT LoRA at a matched budget and
full fine-tuning, on SmolLM2-135M (its real weights) and on the Llama-3.2-1B architecture (random weights).

Each (model, method) trains in its own process. Memory: the process's resident set (RSS) sampled every 5 ms
while it trains, its peak, and that peak minus the RSS just before training (what training adds to the loaded
model: activations, gradients, optimiser states). Settings: base weights in bfloat16 under bfloat16 autocast, AdamW, WARMUP untimed steps then STEPS timed ones
(median step time). Full fine-tuning trains every weight in place in bfloat16 with bfloat16 AdamW states, the
cheapest full fine-tuning there is (fp32 master weights would need 16 bytes per parameter, ~20 GB for 1B):
the adapters' savings against it are therefore a lower bound.

    python benchmarks/training_cost.py                          # both models, all three methods
    python benchmarks/training_cost.py --models smollm2-135m --steps 2 --warmup 1     # quicker
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import ARCHITECTURES, machine, today

SHAPES = {  # batch x sequence length per model: the 1B steps take tens of seconds each on a CPU
    "smollm2-135m": (4, 256),
    "llama-3.2-1b-random": (1, 256),
}
ARCHITECTURE = {"smollm2-135m": "SmolLM2-135M", "llama-3.2-1b-random": "Llama-3.2-1B"}  # names in ARCHITECTURES
METHODS = ("moe", "lora", "full")


def build(model_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_expert import load_base_model

    if model_name == "smollm2-135m":
        return load_base_model("smollm2-135m", dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURES[ARCHITECTURE[model_name]]))
    return model.to(torch.bfloat16)


def moe_trainable(model_name: str) -> int:
    """The default MoE adapters' trainable parameters on this architecture (counted on the meta device)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_expert import ExpertConfig, augment_model

    with torch.device("meta"):
        model = augment_model(LlamaForCausalLM(LlamaConfig(**ARCHITECTURES[ARCHITECTURE[model_name]])), ExpertConfig())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class RSSSampler:
    """Peak resident set size of this process, sampled every ``interval`` seconds in a thread (Linux)."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.peak, self.stop = interval, self.current(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.current())


def train_step(model, optimizer, ids, method: str, device_type: str = "cpu") -> None:
    """One AdamW step on ``ids`` under bfloat16 autocast; the MoE method adds its router losses."""
    import torch

    from llama_expert.integration.surgery import weighted_router_loss

    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        if method == "moe":
            loss = loss + weighted_router_loss(model)[0]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def child(model_name: str, method: str, steps: int, warmup: int) -> dict:
    """Train ``steps`` timed steps in this process and return the measurements."""
    import gc

    import torch

    from llama_expert import ExpertConfig, augment_model
    from llama_expert.integration.peft_lora import add_lora, matched_lora_rank

    model = build(model_name)
    moe_budget = None
    if method == "moe":
        model = augment_model(model, ExpertConfig())
    elif method == "lora":
        moe_budget = moe_trainable(model_name)
        model = add_lora(model, matched_lora_rank(model, moe_budget))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    batch, seq_len = SHAPES[model_name]
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    gc.collect()
    before = RSSSampler.current()
    sampler = RSSSampler().__enter__()
    for step in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        started = time.perf_counter()
        train_step(model, optimizer, ids, method)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    sampler.__exit__()
    return {"model": model_name, "method": method, "trainable": sum(p.numel() for p in trainable),
            "batch": batch, "seq_len": seq_len, "step_seconds": statistics.median(times),
            "steps_timed": steps, "rss_before_bytes": before, "peak_rss_bytes": sampler.peak,
            "training_rss_bytes": sampler.peak - before,
            "lora_matched_to": moe_budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.warmup)))
        return
    rows = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", model_name, method, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"measured {model_name} {method}", file=sys.stderr, flush=True)
    print(f"training cost, {today()}, {machine('cpu')}, median of {args.steps} steps after {args.warmup} warm-up; "
          "RSS sampled every 5 ms while training")
    print("| model | method | trainable | batch x seq | step time | vs full FT | tokens/s | peak RSS | "
          "added by training | vs full FT |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        full = next((r for r in rows if r["model"] == row["model"] and r["method"] == "full"), None)
        tokens = row["batch"] * row["seq_len"]
        time_ratio = f"{row['step_seconds'] / full['step_seconds']:.2f}x" if full else "-"
        mem_ratio = f"{row['training_rss_bytes'] / full['training_rss_bytes']:.2f}x" if full else "-"
        print(f"| {row['model']} | {row['method']} | {row['trainable']:,} | {row['batch']} x {row['seq_len']} | "
              f"{row['step_seconds']:.2f} s | {time_ratio} | {tokens / row['step_seconds']:,.0f} | "
              f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['training_rss_bytes'] / 2**30:.2f} GiB | {mem_ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
