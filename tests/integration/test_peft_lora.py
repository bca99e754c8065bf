"""The plain-LoRA baseline's budget matching: LoRA parameters per unit of rank, and the closest rank."""

import json

from llama_expert.integration.peft_lora import lora_parameters_per_rank, matched_lora_rank, plain_lora_departure


def test_matched_lora_rank_is_closest_to_the_budget(tiny_model):
    per_rank = lora_parameters_per_rank(tiny_model)
    assert per_rank == 4 * (2 * (64 + 128) + (128 + 64))  # gate, up: 64->128; down: 128->64; 4 layers
    assert matched_lora_rank(tiny_model, 3 * per_rank + 10) == 3
    assert matched_lora_rank(tiny_model, 3 * per_rank + per_rank // 2 + 1) == 4  # rounds to the nearest rank
    assert matched_lora_rank(tiny_model, 1) == 1  # never below rank 1


def test_parameters_per_rank_is_what_peft_adds(tiny_model):
    import pytest

    pytest.importorskip("peft")
    from llama_expert.integration.peft_lora import add_lora

    per_rank = lora_parameters_per_rank(tiny_model)
    model = add_lora(tiny_model, rank=3)
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert added == 3 * per_rank


def test_what_makes_a_saved_lora_more_than_a_plain_one_is_named():
    """A mix computes plain LoRAs on the MLP: every other saved setting that changes what a LoRA computes is named
    (a newer PEFT's unknown field too), the ones that do not are let through."""
    import peft

    plain = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj"], use_rslora=True,
                            rank_pattern={"down_proj": 2}).to_dict()
    plain = json.loads(json.dumps(plain, default=str))
    assert plain_lora_departure(plain) is None
    for change, named in (({"use_dora": True}, "use_dora=True"), ({"alora_invocation_tokens": [7]}, "alora"),
                          ({"layer_replication": [[0, 2]]}, "layer_replication"), ({"lora_bias": True}, "lora_bias"),
                          ({"bias": "all"}, "bias='all'"), ({"alpha_pattern": {"up_proj": 3}}, "alpha_pattern"),
                          ({"init_lora_weights": "pissa"}, "changes the base"), ({"modules_to_save": ["lm_head"]},
                                                                                "modules_to_save"),
                          ({"use_fancy_lora": True}, "does not know")):
        assert named in plain_lora_departure({**plain, **change}), change
