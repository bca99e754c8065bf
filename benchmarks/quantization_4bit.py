"""The 4-bit base (``--quantization-4bit``), measured against the bfloat16 base on the same machine, same run:

1. weight bytes: every Linear of the decoder layers, and the whole model (on a CPU the tied embedding / output head
   is int4 too, one table; bitsandbytes on CUDA keeps it in bfloat16, as in QLoRA);
2. base perplexity on the WikiText-2 test text (the adapters compute exactly the base before training);
3. 20 training steps of the MoE adapters on each base: validation perplexity before and after, peak memory.

Each training run is its own `llama-expert train` process (its peak is its own): optimum-quanto int4 on a CPU,
bitsandbytes NF4 on CUDA.

    python benchmarks/quantization_4bit.py [--model smollm2-135m] [--steps 20] [--out runs/quantization-4bit]
    python benchmarks/quantization_4bit.py --tables   # CPU: the token table's formats, bytes and base perplexity
"""

import argparse
import json
from pathlib import Path

import torch

from llama_expert.metrics.memory import model_bytes, tensor_bytes

from common import PROSE, PROSE_TEST, llama_expert, machine, today


def weight_bytes(model) -> dict:
    """Bytes of the decoder layers' Linear weights and of every distinct parameter and buffer of the model."""
    linear = sum(tensor_bytes(module.weight) for name, module in model.named_modules()
                 if ".layers." in name and hasattr(module, "weight") and module.weight is not None
                 and module.weight.dim() == 2)
    return {"linear": linear, "model": model_bytes(model)}


def train(model: str, quantized: bool, steps: int, out: Path) -> dict:
    folder = out / ("4bit" if quantized else "bfloat16")
    llama_expert("train", "--model", model, "--method", "moe", "--dataset", PROSE, "--test-dataset", PROSE_TEST,
                 "--test-max-tokens", "8192", "--test-seq-len", "512", "--max-steps", str(steps), "--batch-size", "4",
                 "--seq-len", "256", "--learning-rate", "1e-2", "--eval-every", "100000", "--eval-max-tokens", "8192",
                 "--dtype", "bfloat16", "--seed", "1", "--output-dir", str(folder), "--overwrite", "--no-progress",
                 *(["--quantization-4bit"] if quantized else []), quiet=True)
    return json.loads((folder / "training_summary.json").read_text())


def test_windows(model: str, max_tokens: int = 8192, seq_len: int = 512):
    """The first ``max_tokens`` WikiText-2 test tokens in windows of ``seq_len``, as ``train --test-dataset`` cuts
    them (so the base perplexity here is the training summaries' ``test.before``)."""
    from llama_expert.data import load_split, pack_blocks, tokenize_documents
    from llama_expert.integration.base_models import load_tokenizer

    tokenizer = load_tokenizer(model)
    docs = load_split(PROSE_TEST, None, tokenizer, "test")
    return pack_blocks(tokenize_documents(docs, tokenizer, progress=False), seq_len, max_tokens=max_tokens)


def table_formats(model: str) -> str:
    """Every CPU format of the tied embedding / output head (the Linear layers int4, groups of 32, throughout):
    whole-model bytes and base perplexity against the bfloat16 base."""
    from llama_expert.metrics.perplexity import evaluate_perplexity
    from llama_expert.integration.base_models import CPU_4BIT_TABLE, CPU_4BIT_TABLE_FORMATS, load_base_model, \
        quantize_4bit_on_cpu

    windows = test_windows(model)
    rows = []
    for name in ["bfloat16 base", *CPU_4BIT_TABLE_FORMATS]:
        base = load_base_model(model, dtype="bfloat16").eval()
        if name != "bfloat16 base":
            quantize_4bit_on_cpu(base, name)
        rows.append((name, weight_bytes(base)["model"], evaluate_perplexity(base, windows)["perplexity"]))
    ref_bytes, ref_ppl = rows[0][1], rows[0][2]
    lines = [f"`python benchmarks/quantization_4bit.py --model {model} --tables` ({machine('cpu')}, {today()}); "
             f"Linear layers: optimum-quanto int4, groups of 32; base perplexity on the first {windows.numel():,} "
             f"WikiText-2 test tokens, windows of {windows.shape[1]}, bfloat16", "",
             "| token table | whole model | vs bf16 | base test PPL | vs bf16 |", "|---|---:|---:|---:|---:|"]
    for name, size, ppl in rows:
        label = f"{name} (default)" if name == CPU_4BIT_TABLE else name
        lines.append(f"| {label} | {size / 2**20:,.1f} MiB | {size / ref_bytes:.3f}x | {ppl:.3f} | "
                     f"{100 * (ppl / ref_ppl - 1):+.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="runs/quantization-4bit")
    parser.add_argument("--tables", action="store_true", help="compare the CPU token-table formats instead")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tables:
        text = table_formats(args.model)
        (out / "token_tables.md").write_text(text)
        print(text)
        return

    from llama_expert.integration.base_models import load_base_model

    sizes = {name: weight_bytes(load_base_model(args.model, dtype="bfloat16", quantization_4bit=q))
             for name, q in (("bfloat16", False), ("4-bit", True))}
    runs = {name: train(args.model, q, args.steps, out) for name, q in (("bfloat16", False), ("4-bit", True))}

    from llama_expert.integration.base_models import CPU_4BIT_TABLE

    backend = "bitsandbytes NF4 (CUDA)" if torch.cuda.is_available() else \
        f"optimum-quanto int4, groups of 32, token table {CPU_4BIT_TABLE} (CPU)"
    lines = [f"`python benchmarks/quantization_4bit.py --model {args.model} --steps {args.steps}` "
             f"({machine()}, {today()}); 4-bit: {backend}; training: "
             f"MoE adapters, {args.steps} steps x 4 x 256 tokens of WikiText-2, lr 1e-2, compute in bfloat16", "",
             "| base | Linear weights | vs bf16 | whole model | vs bf16 | base test PPL | vs bf16 | "
             "validation PPL before -> after | peak training memory | vs bf16 | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    ref, ref_run = sizes["bfloat16"], runs["bfloat16"]
    for name in ("bfloat16", "4-bit"):
        size, run = sizes[name], runs[name]
        base_ppl, ref_ppl = run["test"]["before"]["perplexity"], ref_run["test"]["before"]["perplexity"]
        lines.append(
            f"| {name} | {size['linear'] / 2**20:,.1f} MiB | {size['linear'] / ref['linear']:.3f}x | "
            f"{size['model'] / 2**20:,.1f} MiB | {size['model'] / ref['model']:.3f}x | {base_ppl:.3f} | "
            f"{100 * (base_ppl / ref_ppl - 1):+.2f}% | {run['initial_validation']['perplexity']:.3f} -> "
            f"{run['final_validation']['perplexity']:.3f} | {run['peak_memory']['bytes'] / 2**30:.2f} GiB | "
            f"{run['peak_memory']['bytes'] / ref_run['peak_memory']['bytes']:.2f}x | "
            f"{run['tokens'] / run['seconds']:,.0f} |")
    lines.append(f"\npeak memory is the {ref_run['peak_memory']['kind']} of each training process")
    text = "\n".join(lines) + "\n"
    (out / "quantization_4bit.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
