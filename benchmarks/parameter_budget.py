"""Trainable-parameter budget of the MoE adapters on the Llama-3.2-1B, Llama-3.2-3B and SmolLM2-135M shapes.

Builds each architecture from its config on the meta device (no weights, no download), augments it and
prints the breakdown: each bank at the default ExpertConfig, then the budget-matched lora_experts settings of
docs/design.md section 3. Usage: python benchmarks/parameter_budget.py [--expert-type shared_core|shared_down|...]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import ExpertConfig, augment_model, parameter_counts, parameter_report

from common import ARCHITECTURES

LORA_R4_SMOLLM2 = 3 * 4 * (576 + 1536) * 30  # PEFT LoRA r=4 on gate/up/down of SmolLM2-135M: 760,320
# (architecture, label, settings): lora_experts matched to LoRA r=4 on SmolLM2-135M, and under 0.2% of Llama 3.2 1B
MATCHED = [("SmolLM2-135M", "lora_experts E=4 r_e=5 uniform",
            dict(expert_type="lora_experts", num_experts=4, expert_rank=5, expert_allocation="uniform")),
           ("SmolLM2-135M", "lora_experts E=4 r_e=5 uniform, null expert",
            dict(expert_type="lora_experts", num_experts=4, expert_rank=5, expert_allocation="uniform",
                 null_expert=True)),
           ("Llama-3.2-1B", "lora_experts E=4 r_e=8 uniform",
            dict(expert_type="lora_experts", num_experts=4, expert_rank=8, expert_allocation="uniform"))]


def counts(architecture: str, settings: dict) -> dict:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURES[architecture]))
    augment_model(model, ExpertConfig(**settings))
    return model, parameter_counts(model)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert-type", default=None,
                        choices=["shared_core", "shared_down", "lora_experts", "mixlora"])
    args = parser.parse_args(argv)
    types = [args.expert_type] if args.expert_type else ["shared_core", "shared_down", "lora_experts"]
    rows = []
    for name in ARCHITECTURES:
        for expert_type in types:
            model, c = counts(name, dict(expert_type=expert_type))
            if name == "Llama-3.2-1B" and expert_type == "shared_core":
                print(f"{name}, default ExpertConfig ({expert_type})")
                print(parameter_report(model))
                print()
            rows.append((name, expert_type, c))
    for name, label, settings in MATCHED:
        if args.expert_type in (None, settings["expert_type"]):
            rows.append((name, label, counts(name, settings)[1]))
    print("| model | expert_type | routers | experts | scales | trainable | total | trainable % | / LoRA r=4 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, label, c in rows:
        versus = f"{c['trainable'] / LORA_R4_SMOLLM2:.4f}" if name == "SmolLM2-135M" else ""
        print(f"| {name} | {label} | {c['routers']:,} | {c['experts']:,} | {c['scales']:,} | {c['trainable']:,} | "
              f"{c['total']:,} | {c['trainable_percent']:.4f}% | {versus} |")


if __name__ == "__main__":
    main()
