"""Distil, merge, export: from an MoE adapter to a dense model any engine serves, measured.

1. `llama-expert distill`: a dense LoRA (no larger than the MoE adapters) trained on the mix's training files
   to match the MoE-augmented model's next-token distributions;
2. multi-domain test perplexity (first TEST_TOKENS tokens per domain, 512-token windows) of the MoE adapter
   and of the distilled LoRA;
3. `llama-expert export --merge` (Transformers folder): max |logits| difference from the unmerged LoRA in
   float32, and decode tokens/s of the merged model over the base's at batch 1 (repeats interleaved);
4. `export --format gguf` (f16 and f32): greedy text of a few prompts from the GGUF file, read back by
   Transformers' GGUF loader and, when `llama-cpp-python` is installed, by llama.cpp, against the merged model.

    python benchmarks/distill_export.py MOE_ADAPTER_DIR [--steps 100] [--out runs/distill-export]
"""

import argparse
import json
from pathlib import Path

import torch

from common import TEST, TRAIN, llama_expert, machine, today

PROMPTS = ["Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
           "def fibonacci(n):\n    ", "The history of the city begins in"]


def read_perplexity(report: Path) -> dict:
    ppl = json.loads(report.read_text())["perplexity"]
    return {"mean": ppl["perplexity"], **{d: v["perplexity"] for d, v in ppl["domains"].items()}}


def test_perplexity(model_or_adapter: Path, report: Path, test_tokens: int) -> dict:
    """Multi-domain test perplexity of an MoE adapter folder or of a model folder, through `benchmark`."""
    source = ["--adapter"] if (model_or_adapter / "adapter_config.json").exists() and \
        "expert_config" in (model_or_adapter / "adapter_config.json").read_text() else ["--model"]
    llama_expert("benchmark", *source, str(model_or_adapter), "--dataset", TEST, "--seq-len", "512", "--max-tokens",
                 str(test_tokens), "--skip-throughput", "--output-json", str(report), "--no-progress")
    return read_perplexity(report)


def greedy(model, tokenizer, prompt: str, tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("--out", default="runs/distill-export")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--test-tokens", type=int, default=16384)
    parser.add_argument("--reuse", action="store_true", help="keep a distilled LoRA and MoE report already in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, merged, gguf = out / "dense-lora", out / "merged", out / "gguf"
    if not (args.reuse and (dense / "distill_summary.json").exists()):
        llama_expert("distill", "--adapter", args.adapter, "--output-dir", str(dense), "--calibration", TRAIN,
                     "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--overwrite", "--no-progress")
    summary = json.loads((dense / "distill_summary.json").read_text())
    llama_expert("export", "--adapter", str(dense), "--merge", "--output-dir", str(merged), "--overwrite")
    # The distilled LoRA is measured merged: `benchmark` takes a model folder, and the merged model computes
    # the LoRA model's logits (the gap is checked below).
    moe_report = out / "moe.json"
    ppl = {"moe": test_perplexity(Path(args.adapter), moe_report, args.test_tokens)
           if not (args.reuse and moe_report.exists()) else read_perplexity(moe_report),
           "distilled": test_perplexity(merged, out / "distilled.json", args.test_tokens)}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_expert.evaluation.throughput import measure_interleaved
    from llama_expert.integration.base_models import load_base_model, load_tokenizer
    from llama_expert.integration.peft_lora import load_lora_model

    base_name = summary["base_model"]
    tokenizer = load_tokenizer(base_name)
    unmerged = load_lora_model(load_base_model(base_name), dense)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(PROMPTS), return_tensors="pt").input_ids
    with torch.no_grad():
        logits_gap = float((plain(ids).logits - unmerged(ids).logits).abs().max())
    base = load_base_model(base_name)
    speed = measure_interleaved([base, plain], num_samples=5, prompt_len=128, new_tokens=32, batch_sizes=[1],
                                progress=False)
    decode = [s["results"][0]["decode_tokens_per_s"] for s in speed]
    texts = {"merged": [greedy(plain, tokenizer, p) for p in PROMPTS]}
    for kind in ("f16", "f32"):
        llama_expert("export", "--adapter", str(dense), "--merge", "--output-dir", str(gguf / kind), "--format",
                     "gguf", "--gguf-type", kind, "--overwrite")
        model = AutoModelForCausalLM.from_pretrained(gguf / kind, gguf_file="model.gguf", dtype=torch.float32).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(gguf / kind, gguf_file="model.gguf")
        texts[f"gguf {kind} (Transformers)"] = [greedy(model, gguf_tokenizer, p) for p in PROMPTS]
    try:
        from llama_cpp import Llama
    except ImportError:
        texts["llama.cpp"] = None
    else:
        llm = Llama(model_path=str(gguf / "f32" / "model.gguf"), n_ctx=512, verbose=False, seed=0)
        texts["llama.cpp (f32)"] = [llm(p, max_tokens=24, temperature=0.0)["choices"][0]["text"] for p in PROMPTS]

    print(f"distil / merge / export of {args.adapter}, {today()}, {machine()}")
    print(f"\ndistilled: rank {summary['rank']}, {summary['student_parameters']:,} parameters (MoE "
          f"{summary['teacher_parameters']:,}), {args.steps} steps x 4 x {args.seq_len}; held-out KL "
          f"{summary['held_out_kl_before']:.4f} -> {summary['held_out_kl_after']:.4f}")
    domains = [d for d in ppl["moe"] if d != "mean"]
    print(f"\n| model | {' | '.join(domains)} | mean | vs MoE |")
    print("|---|" + "---:|" * (len(domains) + 2))
    for name, row in ppl.items():
        print(f"| {name} | {' | '.join(f'{row[d]:.3f}' for d in domains)} | {row['mean']:.3f} | "
              f"{row['mean'] / ppl['moe']['mean']:.3f}x |")
    print(f"\nmerged vs unmerged LoRA, float32: max |logits difference| {logits_gap:.2e}")
    print(f"decode tokens/s at batch 1 (interleaved): base {decode[0]:.1f}, merged {decode[1]:.1f}, "
          f"ratio {decode[1] / decode[0]:.3f}")
    for name, outputs in texts.items():
        if outputs is None:
            print(f"{name}: not installed, not tried")
            continue
        same = sum(a == b for a, b in zip(outputs, texts["merged"]))
        print(f"greedy text, {name}: {same}/{len(PROMPTS)} prompts identical to the merged Transformers model")
    (out / "distill_export.json").write_text(json.dumps(
        {"distill": summary, "perplexity": ppl, "logits_gap": logits_gap, "decode_tokens_per_s": decode,
         "texts": texts}, indent=1) + "\n")


if __name__ == "__main__":
    main()
