"""Trainable-parameter budget of the MoE adapters on the Llama-3.2-1B, Llama-3.2-3B and SmolLM2-135M shapes.

Builds each architecture from its config on the meta device (no weights, no download), augments it and
prints the breakdown. Usage: python benchmarks/parameter_budget.py [--expert-type shared_core|shared_down]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import ExpertConfig, augment_model, parameter_counts, parameter_report

from common import ARCHITECTURES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert-type", default=None, choices=["shared_core", "shared_down"])
    args = parser.parse_args(argv)
    types = [args.expert_type] if args.expert_type else ["shared_core", "shared_down"]
    rows = []
    for name, fields in ARCHITECTURES.items():
        for expert_type in types:
            with torch.device("meta"):
                model = LlamaForCausalLM(LlamaConfig(**fields))
            augment_model(model, ExpertConfig(expert_type=expert_type))
            if name == "Llama-3.2-1B" and expert_type == "shared_core":
                print(f"{name}, default ExpertConfig ({expert_type})")
                print(parameter_report(model))
                print()
            c = parameter_counts(model)
            rows.append((name, expert_type, c["routers"], c["experts"], c["scales"], c["trainable"], c["total"],
                         c["trainable_percent"]))
    print("| model | expert_type | routers | experts | scales | trainable | total | trainable % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:,} | {r[4]:,} | {r[5]:,} | {r[6]:,} | {r[7]:.4f}% |")


if __name__ == "__main__":
    main()
