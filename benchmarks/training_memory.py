"""Peak training memory of MoE adapters vs PEFT LoRA at a matched budget, same batch and length.

Each method trains a few steps in its own process (`llama-expert train`), so each peak is its own: peak
CUDA allocated on a GPU, peak RSS of the process on a CPU (that includes loading the model, which is the
same for both). Usage: python benchmarks/training_memory.py [--steps 3] [--dtype bfloat16] [extra train flags]
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import PROSE, llama_expert, machine, today


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=4, help="4 matches the default MoE budget on SmolLM2-135M")
    parser.add_argument("--dataset", default=PROSE)
    args, extra = parser.parse_known_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("moe", "lora"):
            out = Path(tmp) / method
            lora = ["--lora-r", str(args.lora_r)] if method == "lora" else []
            llama_expert("train", "--method", method, "--dataset", args.dataset, "--max-steps", str(args.steps),
                         "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--dtype", args.dtype,
                         "--eval-every", "0", "--eval-max-tokens", "512", "--output-dir", str(out), "--no-progress",
                         *extra, *lora, quiet=True)
            s = json.loads((out / "training_summary.json").read_text())
            rows.append((method, s["trainable_parameters"], s["peak_memory"]["bytes"], s["peak_memory"]["kind"],
                         s["tokens"] / s["seconds"]))
    print(f"training memory, {args.steps} steps x batch {args.batch_size} x {args.seq_len} tokens, base {args.dtype}, "
          f"{today()}, {machine()}")
    print("| method | trainable params | peak memory | measured as | tokens/s |")
    print("|---|---:|---:|---|---:|")
    for method, trainable, peak, kind, speed in rows:
        print(f"| {method} | {trainable:,} | {peak / 2**20:,.0f} MiB | {kind} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
