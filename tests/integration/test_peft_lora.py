"""The plain-LoRA baseline's budget matching: LoRA parameters per unit of rank, and the closest rank."""

from llama_expert.integration.peft_lora import lora_parameters_per_rank, matched_lora_rank


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
