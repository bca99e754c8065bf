"""Writes the frozen adapter files of tests/regression/adapters/ with whichever llama-expert is importable.

Each adapter format this project has written is kept as files that the version of its time wrote, with the
logits that version computed, so that a reader of today is tested against real old files (not today's writer
output edited to look old). Run from the repository root with an old version's source on PYTHONPATH, e.g.
format 1 (the last commit before format 2):

    git archive 0c70a68^ src | tar -x -C /tmp/v1 && PYTHONPATH=/tmp/v1/src python tests/regression/write_adapters.py v1

A name after the version writes that adapter alone (v3's ``lora_experts-prototype-null`` was added to the v3 list
when format 4 changed the prototype router, and written from the last format-3 commit).

``--base`` first writes the tiny base model they are all trained on (tests/regression/base, 100 KB).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path("tests/regression")
BASE = HERE / "base"  # relative: the adapters record it as it was given, which holds on any checkout
INPUT_IDS = torch.arange(2 * 16).reshape(2, 16) * 7 % 128  # two sequences, every position a different token
MIX = {"expert_type": "lora_experts", "router_type": "prototype", "null_expert": True}  # as `mix --null-expert` writes
# (name, ExpertConfig fields): the strategies each format's version had
CONFIGS = {"v1": [("shared_core", {})],
           "v2": [("shared_core", {}), ("shared_down-aux_free", {"expert_type": "shared_down", "router_type": "aux_free"})],
           "v3": [("shared_core", {}), ("shared_down-aux_free", {"expert_type": "shared_down", "router_type": "aux_free"}),
                  ("shared_core-expert_choice", {"router_type": "expert_choice"}),
                  ("lora_experts-prototype-null", MIX)],
           "v4": [("shared_core", {}), ("lora_experts-prototype-null", MIX)]}


def write_base() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=128, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(BASE)


def write(version: str, names=()) -> None:
    """The adapters of ``version`` (only ``names`` when given: a strategy added to a past version's list)."""
    import llama_expert
    from llama_expert import ExpertConfig, augment_model, save_adapter

    for name, fields in CONFIGS[version]:
        if names and name not in names:
            continue
        model = LlamaForCausalLM.from_pretrained(str(BASE)).eval()
        augment_model(model, ExpertConfig(num_experts=4, top_k=2, lora_r=4, **fields))
        torch.manual_seed(1)
        with torch.no_grad():  # every adapter tensor random, so the adapter visibly changes the logits
            for parameter in (p for n, p in model.named_parameters() if ".mlp." in n and p.requires_grad):
                parameter.copy_(torch.randn(parameter.shape) * 0.2)
        folder = HERE / "adapters" / version / name
        save_adapter(model, folder)
        with torch.no_grad():
            logits = model(input_ids=INPUT_IDS).logits
        save_file({"input_ids": INPUT_IDS.contiguous(), "logits": logits.contiguous()},
                  str(folder.parent / f"{name}.reference.safetensors"))
        print(f"{folder}: written by llama-expert {getattr(llama_expert, '__version__', '?')} from "
              f"{Path(llama_expert.__file__).parent}")


if __name__ == "__main__":
    write_base() if sys.argv[1] == "--base" else write(sys.argv[1], sys.argv[2:])
