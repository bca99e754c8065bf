"""The lora_experts bank: experts that own their A_i and B_i (its formula is checked against a per-token loop in
test_reference.py, its fast paths in test_fused_inference.py). Here: the exact no-op at step 0, the default rank,
the parameter count, that each expert learns in its own subspace, and what it refuses."""

import pytest
import torch

from llama_expert import ConfigError, ExpertConfig
from llama_expert.modeling import EXPERT_BANKS, MoEAdapter, check_config
from llama_expert.modeling.lora_experts import LoRAExperts

HIDDEN = 12


def _bank(**kw):
    config = ExpertConfig(expert_type="lora_experts", num_experts=4, top_k=2, lora_r=8, lora_dropout=0.0, **kw)
    return EXPERT_BANKS.get("lora_experts").from_config(HIDDEN, 4, config)


def _routing(tokens=10, experts=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(tokens, experts, generator=generator).argsort(-1)[:, :2]
    return indices, torch.rand(tokens, 2, generator=generator)


def test_the_bank_is_registered_and_outputs_exactly_zero_at_step_zero():
    bank = _bank(shared_expert_rank=3)
    assert isinstance(bank, LoRAExperts)
    hidden = torch.randn(10, HIDDEN) * 100
    out = bank(hidden, *_routing())
    assert torch.equal(out, torch.zeros_like(out))
    assert bank.down.abs().sum() > 0 and bank.shared_down.abs().sum() > 0  # A random, B zero


@pytest.mark.parametrize("kw,rank", [({}, 2), ({"expert_rank": 5}, 5), ({"lora_r": 2}, 1)])
def test_the_expert_rank_defaults_to_lora_r_over_num_experts(kw, rank):
    config = {"lora_r": 8, **kw}
    bank = EXPERT_BANKS.get("lora_experts").from_config(
        HIDDEN, 4, ExpertConfig(expert_type="lora_experts", num_experts=4, top_k=2, **config))
    assert bank.down.shape == bank.up.shape == (4, rank, HIDDEN)
    assert bank.shared_down is None and bank.shared_up is None  # shared_expert_rank 0: no shared expert


def test_the_parameter_count_is_two_d_times_the_ranks():
    bank = _bank(expert_rank=3, shared_expert_rank=2)
    assert sum(p.numel() for p in bank.parameters()) == 2 * HIDDEN * (4 * 3 + 2)


def test_each_expert_learns_in_its_own_subspace():
    """After one step, expert i's output moves along its own B_i (span of its own rows), not a shared B."""
    torch.manual_seed(0)
    bank = _bank(expert_rank=2)
    hidden = torch.randn(16, HIDDEN)
    indices = torch.tensor([[0, 1]] * 8 + [[2, 0]] * 8)
    gates = torch.full((16, 2), 0.5)
    bank(hidden, indices, gates).pow(2).sum().backward()  # B = 0: A gets no gradient yet
    assert bank.down.grad.abs().sum() == 0
    target = torch.randn(16, HIDDEN)
    bank.zero_grad()
    (bank(hidden, indices, gates) - target).pow(2).sum().backward()
    moved = bank.up.grad.abs().sum(dim=(1, 2))
    assert moved[0] > 0 and moved[1] > 0 and moved[2] > 0
    assert moved[3] == 0  # never chosen: untouched


def test_distinct_init_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="--expert-type lora_experts does not support --expert-init distinct.*"
                                          "use --expert-init zero"):
        check_config(ExpertConfig(expert_type="lora_experts", expert_init="distinct"))


@pytest.mark.parametrize("kw,words", [({"expert_rank": 0}, "--expert-rank must be a positive integer"),
                                      ({"shared_expert_rank": -1}, "--shared-expert-rank must be an integer >= 0")])
def test_bad_ranks_are_refused(kw, words):
    with pytest.raises(ConfigError, match=words):
        ExpertConfig(**kw)


def test_an_adapter_with_lora_experts_equals_the_base_mlp_at_step_zero():
    mlp = torch.nn.Linear(HIDDEN, HIDDEN)
    adapter = MoEAdapter(mlp, HIDDEN, 4, ExpertConfig(expert_type="lora_experts", num_experts=4,
                                                      shared_expert_rank=2, null_expert=True))
    hidden = torch.randn(2, 5, HIDDEN)
    assert torch.equal(adapter(hidden), mlp(hidden))
