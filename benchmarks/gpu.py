"""The GPU benchmark in one script: training and decoding, side by side, written as a Markdown table.

For the SmolLM2-135M, Llama-3.2-1B and Llama-3.2-3B architectures with random weights (speed and memory do not
depend on the weights' values, and the machine need not hold any checkpoint), in bfloat16:

- training tokens/s and peak memory of MoE adapters, PEFT LoRA at the MoE's size and full fine-tuning, with
  and without gradient checkpointing, and (adapters only) on a 4-bit base: bitsandbytes NF4 with double
  quantisation and bfloat16 compute on CUDA, the settings ``--quantization-4bit`` loads with there;
  optimum-quanto int4 on a CPU, as ``--quantization-4bit`` does there;
- decode tokens/s at batch 1 and 32 of the base, the MoE-augmented model and a merged LoRA model (merged, it
  is the base architecture with other weights), repeats interleaved;
- the compiled rows, for the models of ``--compiled-models``: MoE training with ``--compile adapters``
  (training/compilation.py) beside the eager rows, and decoding of the base and the MoE model on a static KV cache
  replayed as CUDA graphs (``compiled_decode``, what inference, serve and benchmark do on CUDA by default),
  interleaved with the eager decode rows in the same samples. On a CPU (``--tiny``) nothing compiles for decoding:
  those rows say so, and the dry run only proves the code runs.

Sized to finish well inside 8 minutes on one H200; ``--budget-s`` skips the rows left when time runs out (the
table says which), and the table is rewritten after every row, so a run cut short still leaves its rows. `--tiny` runs the same code on tiny shapes in a few seconds
on a CPU (the test suite does, so the script cannot rot between GPU loans).

    bash benchmarks/gpu.sh                      # on a CUDA machine; writes runs/gpu/gpu_table.md
    python benchmarks/gpu.py --tiny --out /tmp/gpu-dry-run
"""

import argparse
import gc
import os
import statistics
import time

import torch

from common import ARCHITECTURES, machine, today

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, head_dim=16)


def build(name: str, tiny: bool, device: str):
    """The architecture ``name`` with random weights in bfloat16, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**(TINY if tiny else ARCHITECTURES[name])))
    return model.to(torch.bfloat16)


def quantize_4bit(model, device: str):
    """4-bit weights for the decoder's Linear layers as ``--quantization-4bit`` gives them on ``device``."""
    if not device.startswith("cuda"):
        from llama_expert.integration.base_models import quantize_4bit_on_cpu

        return quantize_4bit_on_cpu(model)
    import bitsandbytes as bnb  # the BitsAndBytesConfig of base_models: NF4, double quantisation, bf16 compute

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                  compute_dtype=torch.bfloat16, compress_statistics=True,
                                                  quant_type="nf4", device="meta")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                         quant_type="nf4", module=quantized).to(device)
                    setattr(parent, child_name, quantized)
    torch.cuda.empty_cache()
    return model


class Peak:
    """Peak memory of what runs inside: CUDA allocations on a GPU, sampled RSS on a CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from training_cost import RSSSampler
            self.sampler = RSSSampler().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.sampler.__exit__()
            self.bytes = self.sampler.peak


def train_row(name, method, checkpointing, four_bit, args, device, compiled=False):
    from llama_expert import ExpertConfig, augment_model
    from llama_expert.training.compilation import compile_for_training
    from training_cost import train_step
    from llama_expert.integration.peft_lora import add_lora, matched_lora_rank

    model = build(name, args.tiny, device)
    if four_bit:
        quantize_4bit(model, device)
    if method == "moe":
        model = augment_model(model, ExpertConfig())
        compile_for_training(model, "adapters" if compiled else "none", args.compile_backend)  # in the warm-up
    elif method == "lora":
        with torch.device("meta"):
            from transformers import LlamaForCausalLM
            budget = sum(p.numel() for p in augment_model(LlamaForCausalLM(model.config), ExpertConfig()).parameters()
                         if p.requires_grad)
        model = add_lora(model, matched_lora_rank(model, budget))
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.config.vocab_size
    times = []
    with Peak(device) as peak:
        for step in range(args.warmup + args.steps):
            ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            train_step(model, optimizer, ids, method, device.split(":")[0])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
    row = {"model": name + (" (tiny)" if args.tiny else ""), "method": method + (" compiled" if compiled else ""),
           "checkpointing": checkpointing, "four_bit": four_bit,
           "trainable": sum(p.numel() for p in trainable),
           "tokens_per_s": args.batch * args.seq_len / statistics.median(times), "peak_bytes": peak.bytes}
    del model, optimizer
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def decode_rows(name, args, device):
    """Eager base, MoE and merged LoRA; for ``--compiled-models`` also the base and MoE compiled (static cache, CUDA
    graphs), all in the same interleaved samples."""
    from decode_speed import random_merged_lora, random_moe

    from llama_expert.evaluation.throughput import measure_interleaved

    base = build(name, args.tiny, device).eval()
    moe, merged = random_moe(base), random_merged_lora(base)
    models, labels, compiled = [base, moe, merged], ["base", "MoE adapters", "merged LoRA"], [False] * 3
    if name in args.compiled_models:
        models, labels, compiled = models + [base, moe], labels + ["base", "MoE adapters"], compiled + [True, True]
    measured = measure_interleaved(models, args.decode_samples, args.prompt_len, args.new_tokens,
                                   args.decode_batches, progress=False, compiled_decode=compiled)
    rows = []
    for label, switch, result in zip(labels, compiled, measured):
        if switch:
            label += " compiled" if result["compiled_decode"] else " compiled (asked; a CPU decodes eagerly)"
        for r in result["results"]:
            rows.append({"model": name + (" (tiny)" if args.tiny else ""), "variant": label, "batch": r["batch_size"],
                         "decode_tokens_per_s": r["decode_tokens_per_s"]})
    del base, moe, merged
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def write_table(path: str, args, device: str, started: float, training, decoding, skipped) -> str:
    lines = [f"# GPU benchmark{' (tiny dry run)' if args.tiny else ''}", "",
             f"{today()}, {machine(device)}, bfloat16, random weights; training: "
             f"batch {args.batch} x {args.seq_len} tokens, median of {args.steps} steps after {args.warmup}; decode: "
             f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.decode_samples}, interleaved; "
             f"{time.time() - started:.0f} s in all. Peak memory: "
             f"{'torch.cuda.max_memory_allocated' if device == 'cuda' else 'sampled RSS'}.", "",
             "| model | method | gradient checkpointing | 4-bit base | trainable | tokens/s | peak memory |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in training:
        lines.append(f"| {r['model']} | {r['method']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{'yes' if r['four_bit'] else 'no'} | {r['trainable']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_bytes'] / 2 ** 30:.2f} GiB |")
    lines += ["", "| model | variant | batch | decode tokens/s |", "|---|---|---:|---:|"]
    for r in decoding:
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['decode_tokens_per_s']:,.1f} |")
    if skipped:
        lines += ["", f"Not measured (the {args.budget_s:.0f} s budget ran out): " + "; ".join(skipped) + "."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text


def training_rows(name, args):
    """(method, checkpointing, 4-bit, compiled) of every training row: MoE and LoRA with and without checkpointing
    and a 4-bit base, full fine-tuning with and without checkpointing, and for ``--compiled-models`` the MoE
    adapters compiled (no checkpointing, which --compile refuses; a bf16 base)."""
    for method in ("moe", "lora", "full"):
        for checkpointing in (False, True):
            for four_bit in ((False, True) if method != "full" else (False,)):
                yield method, checkpointing, four_bit, False
                if method == "moe" and not checkpointing and not four_bit and name in args.compiled_models:
                    yield method, checkpointing, four_bit, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="SmolLM2-135M,Llama-3.2-1B,Llama-3.2-3B", help=", ".join(ARCHITECTURES))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run on a CPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--decode-batches", default="1,32")
    parser.add_argument("--decode-samples", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--compiled-models", default="Llama-3.2-1B",
                        help="models that also get the compiled rows (training --compile adapters, compiled decode)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled training row (the CPU dry-run test: aot_eager, "
                             "the same graphs without generating code)")
    parser.add_argument("--budget-s", type=float, default=300, help="start no row after this many seconds")
    parser.add_argument("--out", default="runs/gpu")
    args = parser.parse_args()
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    args.compiled_models = args.compiled_models.split(",")
    if args.tiny:
        args.compiled_models = args.models.split(",")  # the dry run runs every row
        args.steps, args.warmup, args.batch, args.seq_len = 1, 1, 2, 32
        args.decode_samples, args.prompt_len, args.new_tokens = 1, 8, 4
        args.decode_batches = [1, 2]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = os.path.join(args.out, "gpu_table.md")
    started = time.time()
    training, decoding, skipped = [], [], []
    for name in args.models.split(","):
        for method, checkpointing, four_bit, compiled in training_rows(name, args):
            label = f"{name} {method}{' compiled' * compiled} checkpointing={checkpointing} 4bit={four_bit}"
            if time.time() - started > args.budget_s:
                skipped.append("training " + label)
                continue
            training.append(train_row(name, method, checkpointing, four_bit, args, device, compiled))
            print(f"trained {label}: {training[-1]['tokens_per_s']:,.0f} tokens/s, "
                  f"{training[-1]['peak_bytes'] / 2 ** 30:.2f} GiB ({time.time() - started:.0f} s)", flush=True)
            write_table(path, args, device, started, training, decoding, skipped)
        if time.time() - started > args.budget_s:
            skipped.append(f"decoding {name}")
            continue
        decoding += decode_rows(name, args, device)
        print(f"decoded {name} ({time.time() - started:.0f} s)", flush=True)
        write_table(path, args, device, started, training, decoding, skipped)
    print(write_table(path, args, device, started, training, decoding, skipped))


if __name__ == "__main__":
    main()
