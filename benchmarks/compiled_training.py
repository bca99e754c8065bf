"""Training speed of MoE adapters, eager against ``--compile adapters`` (training/compilation.py), side by side.

Two copies of one model with the same random weights and adapters (non-zero, as after training) train on the same
random batches in one process: a warm-up step each (the compiled copy compiles there: one graph per expert count),
then ``--samples`` rounds, each timing ``--steps`` steps of the eager copy and then of the compiled one (interleaved,
so a noisy machine slows both alike). A step is forward, router losses, backward and AdamW, as ``train`` runs it
(float32 on a CPU, as ``--mixed-precision auto`` does there; bfloat16 autocast on a GPU). Reported: tokens/s of each
(median over the rounds), the median of the rounds' ratios, and every round's ratio.

    OMP_NUM_THREADS=1 python benchmarks/compiled_training.py --out runs/compiled-training
    python benchmarks/compiled_training.py --tiny --out /tmp/compiled-dry-run     # seconds (after compiling)
"""

import argparse
import copy
import os
import statistics
import time

import torch

from common import ARCHITECTURES, command, machine, today
from gpu import TINY


def build(name: str, tiny: bool, device: str):
    """``name``'s architecture, random weights, float32, the default MoE adapters with random non-zero experts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_expert import ExpertConfig, augment_model

    torch.manual_seed(0)
    with torch.device(device):
        model = augment_model(LlamaForCausalLM(LlamaConfig(**(TINY if tiny else ARCHITECTURES[name]))),
                              ExpertConfig(lora_dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def step_seconds(model, optimizer, ids, device: str) -> float:
    from llama_expert.integration.surgery import weighted_router_loss

    synchronize(device)
    started = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss + weighted_router_loss(model)[0]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, args, device: str) -> dict:
    """Interleaved tokens/s of the eager and the compiled copy; the compile time of the warm-up step."""
    from llama_expert.training.compilation import compile_for_training

    eager = build(name, args.tiny, device)
    compiled = compile_for_training(copy.deepcopy(eager), "adapters")
    models = {"eager": eager, "compiled": compiled}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for k, m in models.items()}
    generator = torch.Generator().manual_seed(1)
    vocab = eager.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator).to(device)
               for _ in range(args.steps)]
    warmup = {k: step_seconds(m, optimizers[k], batches[0], device) for k, m in models.items()}
    rates = {k: [] for k in models}
    for _ in range(args.samples):
        for k, m in models.items():
            seconds = sum(step_seconds(m, optimizers[k], ids, device) for ids in batches)
            rates[k].append(args.batch * args.seq_len * args.steps / seconds)
    ratios = [c / e for c, e in zip(rates["compiled"], rates["eager"])]
    return {"model": name + (" (tiny)" if args.tiny else ""), "eager": statistics.median(rates["eager"]),
            "compiled": statistics.median(rates["compiled"]), "ratio": statistics.median(ratios), "ratios": ratios,
            "compile_s": warmup["compiled"] - warmup["eager"]}


def table(rows, args, device: str) -> str:
    lines = [f"{command()} ({machine(device)}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
             f"{today()}): batch {args.batch} x {args.seq_len} tokens, {args.steps} steps per round, "
             f"{args.samples} rounds interleaved, {'bfloat16 autocast' if device == 'cuda' else 'float32'}", "",
             "| model | eager tokens/s | compiled tokens/s | compiled / eager (median of rounds) | every round | "
             "first compiled step minus first eager step |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['eager']:,.1f} | {r['compiled']:,.1f} | {r['ratio']:.3f}x | "
                     f"{', '.join(f'{x:.3f}' for x in r['ratios'])} | {r['compile_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="SmolLM2-135M", help=", ".join(ARCHITECTURES))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--samples", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--out", default="runs/compiled-training")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.batch, args.seq_len, args.steps, args.samples = "SmolLM2-135M", 2, 16, 1, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args, device))
        text = table(rows, args, device)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compiled_training.md"), "w") as f:
            f.write(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
